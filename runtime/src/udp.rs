//! UDP sockets with explicit kernel buffers.
//!
//! sFlow arrives in bursts, and a relay that reads a little late loses datagrams in the kernel
//! (`UdpRcvbufErrors`) where no user-space counter sees them. So sockets ask for large buffers,
//! read back what the kernel granted, and warn, naming the sysctl to raise, when it clamped them.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Buffer sizes to ask the kernel for; `None` leaves its default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buffers {
    /// SO_RCVBUF request, bytes.
    pub recv: Option<usize>,
    /// SO_SNDBUF request, bytes.
    pub send: Option<usize>,
}

/// Binds a non-blocking UDP socket at `addr` with the requested buffers.
///
/// An IPv6 address binds IPv6 only, so `0.0.0.0:6343` and `[::]:6343` can be listened on side
/// by side. A clamped buffer is logged as a warning; it is not an error.
///
/// # Errors
///
/// When the socket cannot be created or bound (address in use, no permission for the port).
pub fn bind(addr: SocketAddr, buffers: Buffers) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    apply(&socket, addr, buffers)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A client socket on an ephemeral port that reaches IPv4 and IPv6 peers alike: `[::]:0`
/// with IPv4-mapped addresses allowed, or `0.0.0.0:0` where the host has no IPv6.
///
/// # Errors
///
/// When neither can be bound.
pub fn bind_client(buffers: Buffers) -> io::Result<UdpSocket> {
    let dual = (|| {
        let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_only_v6(false)?;
        socket.bind(&SocketAddr::from(([0u16; 8], 0)).into())?;
        Ok::<_, io::Error>(socket)
    })();
    let Ok(socket) = dual else {
        return bind(SocketAddr::from(([0, 0, 0, 0], 0)), buffers);
    };
    let addr = socket
        .local_addr()?
        .as_socket()
        .unwrap_or_else(|| SocketAddr::from(([0u16; 8], 0)));
    apply(&socket, addr, buffers)?;
    Ok(socket.into())
}

/// Asks for `buffers` on `socket` (reporting clamps) and makes it non-blocking.
fn apply(socket: &Socket, addr: SocketAddr, buffers: Buffers) -> io::Result<()> {
    // Failure to set is not fatal: the read-back reports what we got.
    if let Some(want) = buffers.recv {
        let _ = socket.set_recv_buffer_size(want);
        check_granted(
            addr,
            "receive",
            want,
            socket.recv_buffer_size()?,
            "net.core.rmem_max",
        );
    }
    if let Some(want) = buffers.send {
        let _ = socket.set_send_buffer_size(want);
        check_granted(
            addr,
            "send",
            want,
            socket.send_buffer_size()?,
            "net.core.wmem_max",
        );
    }
    socket.set_nonblocking(true)
}

/// Linux reports twice the size it grants (the doubling covers its bookkeeping), so the
/// usable size is half the read-back.
fn check_granted(addr: SocketAddr, which: &str, want: usize, reported: usize, sysctl: &str) {
    let got = if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    };
    if got < want {
        tracing::warn!(
            %addr,
            requested_bytes = want,
            granted_bytes = got,
            "kernel clamped the socket {which} buffer; bursts may be dropped by the kernel. \
             Raise the limit with `sysctl -w {sysctl}={want}` (and persist it in /etc/sysctl.d/)"
        );
    } else {
        tracing::debug!(%addr, requested_bytes = want, granted_bytes = got, "socket {which} buffer set");
    }
}

/// Sends each of `datagrams` as one datagram on the connected, blocking `socket`, many per
/// system call (sendmmsg). A datagram the kernel refuses (port unreachable reported back, too
/// large) is skipped and reported to `on_error`; the rest still go. Returns how many were sent.
pub fn send_batch(
    socket: &UdpSocket,
    datagrams: &[&[u8]],
    mut on_error: impl FnMut(&[u8], io::Error),
) -> usize {
    let mut batch = SendBatch::new(datagrams.len().clamp(1, SEND_BATCH));
    let mut sent = 0;
    let mut next = 0;
    while next < datagrams.len() {
        match batch.send(socket, &datagrams[next..]) {
            Ok(n) => {
                sent += n;
                next += n;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                // The first datagram of the rest failed: skip it, keep the others.
                on_error(datagrams[next], error);
                next += 1;
            }
        }
    }
    sent
}

/// Datagrams per sendmmsg call of [`SendBatch`].
pub const SEND_BATCH: usize = 64;

/// Sends many datagrams on a connected socket in one system call (sendmmsg), blocking or not.
///
/// It holds no system-call headers between calls (they hold pointers, which would keep the
/// tasks that own a `SendBatch` from moving between threads); each call makes its own.
pub struct SendBatch {
    addrs: Vec<Option<nix::sys::socket::SockaddrStorage>>,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("slots", &self.addrs.len())
            .finish_non_exhaustive()
    }
}

impl SendBatch {
    /// Room for `slots` datagrams per call.
    pub fn new(slots: usize) -> Self {
        Self {
            addrs: vec![None; slots.max(1)],
        }
    }

    /// Sends the first of `datagrams` (up to the slots) in one system call on the connected
    /// `socket`; returns how many the kernel took, at least one.
    ///
    /// # Errors
    ///
    /// The error of the first datagram: `WouldBlock` on a full non-blocking socket (nothing
    /// sent, try again when writable), or the kernel's refusal of that datagram (port
    /// unreachable reported back, too large), which the caller skips.
    pub fn send(&mut self, socket: &impl AsFd, datagrams: &[&[u8]]) -> io::Result<usize> {
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{MsgFlags, MultiHeaders, sendmmsg};

        let n = datagrams.len().min(self.addrs.len());
        if n == 0 {
            return Ok(0);
        }
        let slices: Vec<[IoSlice<'_>; 1]> =
            datagrams[..n].iter().map(|d| [IoSlice::new(d)]).collect();
        let mut headers = MultiHeaders::preallocate(n, None);
        let results = sendmmsg(
            socket.as_fd().as_raw_fd(),
            &mut headers,
            &slices,
            &self.addrs[..n],
            [],
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        match results.count() {
            0 => Err(io::Error::other("datagram not sent")),
            sent => Ok(sent),
        }
    }
}

/// Receive slots per [`RecvBatch::recv`] call.
pub const RECV_BATCH: usize = 32;

/// Reusable space for [`RecvBatch::recv`]: one 64 KiB buffer per slot (no datagram is cut;
/// the kernel writes only what arrives, so untouched pages cost no memory). Like
/// [`SendBatch`], it keeps no system-call headers between calls, so it can live in a task.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    received: Vec<(usize, Option<SocketAddr>)>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.bufs.len())
            .finish_non_exhaustive()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            bufs: (0..RECV_BATCH).map(|_| vec![0u8; 65_536]).collect(),
            received: Vec::with_capacity(RECV_BATCH),
        }
    }
}

impl RecvBatch {
    /// Receives up to [`RECV_BATCH`] datagrams in one system call (recvmmsg). With `wait`,
    /// blocks until at least one is there and then takes what else is queued
    /// (MSG_WAITFORONE); without, returns at once (MSG_DONTWAIT). Returns how many arrived;
    /// read them with [`RecvBatch::datagram`] and [`RecvBatch::source`].
    ///
    /// # Errors
    ///
    /// The system call's error; `WouldBlock` when nothing was queued and `wait` was false.
    pub fn recv(&mut self, socket: &impl AsFd, wait: bool) -> io::Result<usize> {
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, recvmmsg};

        let flags = if wait {
            MsgFlags::MSG_WAITFORONE
        } else {
            MsgFlags::MSG_DONTWAIT
        };
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        self.received.clear();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(RECV_BATCH, None);
        let results = recvmmsg(
            socket.as_fd().as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            flags,
            None,
        )
        .map_err(io::Error::from)?;
        self.received.extend(results.map(|r| {
            let source = r.address.and_then(|a: SockaddrStorage| match a.family() {
                Some(nix::sys::socket::AddressFamily::Inet) => a
                    .as_sockaddr_in()
                    .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4))),
                Some(nix::sys::socket::AddressFamily::Inet6) => a
                    .as_sockaddr_in6()
                    .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6))),
                _ => None,
            });
            (r.bytes, source)
        }));
        Ok(self.received.len())
    }

    /// The `i`-th datagram of the last [`RecvBatch::recv`].
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.received[i].0]
    }

    /// Where the `i`-th datagram of the last [`RecvBatch::recv`] came from (`None` when the
    /// kernel gave no IP address).
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        self.received[i].1
    }
}

/// The kernel's count of datagrams dropped on a full receive buffer for the UDP socket bound
/// to `local` (the `drops` column of `/proc/net/udp` or `/proc/net/udp6`), when it can be found.
pub fn kernel_drops(local: SocketAddr) -> Option<u64> {
    let (path, want_port) = match local {
        SocketAddr::V4(_) => ("/proc/net/udp", local.port()),
        SocketAddr::V6(_) => ("/proc/net/udp6", local.port()),
    };
    let table = std::fs::read_to_string(path).ok()?;
    let mut total = None;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local_field), Some(drops)) = (fields.get(1), fields.last()) else {
            continue;
        };
        let port = local_field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        if port == Some(want_port) {
            *total.get_or_insert(0) += drops.parse::<u64>().unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_batch_sends_every_datagram_in_order() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        let data: Vec<Vec<u8>> = (0..100u8)
            .map(|i| vec![i; 1 + usize::from(i) * 13])
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let sent = send_batch(&sender, &refs, |_, e| panic!("{e}"));
        assert_eq!(sent, 100);
        let mut buf = vec![0u8; 2048];
        for d in &data {
            let n = receiver.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &d[..]);
        }
    }

    #[test]
    fn recv_batch_takes_what_is_queued() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        for i in 0..40u8 {
            sender.send(&vec![i; 100 + usize::from(i)]).unwrap();
        }
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        let n = batch.recv(&receiver, true).unwrap();
        assert_eq!(batch.source(0), Some(sender.local_addr().unwrap()));
        got.extend((0..n).map(|i| batch.datagram(i).to_vec()));
        while let Ok(n) = batch.recv(&receiver, false) {
            got.extend((0..n).map(|i| batch.datagram(i).to_vec()));
        }
        let want: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        assert_eq!(got, want);
        assert_eq!(
            batch.recv(&receiver, false).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn send_batch_skips_what_the_kernel_refuses() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(closed.local_addr().unwrap()).unwrap();
        drop(closed);
        let big = vec![0u8; 70_000];
        let refs: Vec<&[u8]> = vec![b"a", &big, b"b"];
        let mut errors = 0;
        let sent = send_batch(&sender, &refs, |_, _| errors += 1);
        assert!(errors >= 1, "the oversized datagram is refused");
        assert_eq!(sent + errors, 3);
    }

    #[test]
    fn binds_v4_and_v6_side_by_side_and_reads_drops() {
        let v4 = bind(
            "127.0.0.1:0".parse().unwrap(),
            Buffers {
                recv: Some(1 << 20),
                send: None,
            },
        )
        .unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = bind(
            SocketAddr::new("::1".parse().unwrap(), port),
            Buffers::default(),
        ) {
            assert_eq!(v6.local_addr().unwrap().port(), port);
        }
        assert_eq!(kernel_drops(v4.local_addr().unwrap()), Some(0));
    }
}
