//! UDP sockets with explicit kernel buffers.
//!
//! sFlow arrives in bursts, and a relay that reads a little late loses datagrams in the kernel
//! (`UdpRcvbufErrors`) where no user-space counter sees them. So sockets ask for large buffers,
//! read back what the kernel granted, and warn, naming the sysctl to raise, when it clamped them.

use std::io;
use std::net::{SocketAddr, UdpSocket};

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

/// Sends each of `datagrams` as one datagram on the connected `socket`, many per system call
/// (sendmmsg). A datagram the kernel refuses (port unreachable reported back, too large) is
/// skipped and reported to `on_error`; the rest still go. Returns how many were sent.
pub fn send_batch(
    socket: &UdpSocket,
    datagrams: &[&[u8]],
    mut on_error: impl FnMut(&[u8], io::Error),
) -> usize {
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};

    let mut sent = 0;
    let mut next = 0;
    while next < datagrams.len() {
        let rest = &datagrams[next..];
        let slices: Vec<[IoSlice<'_>; 1]> = rest.iter().map(|d| [IoSlice::new(d)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = vec![None; rest.len()];
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(rest.len(), None);
        match sendmmsg(
            socket.as_raw_fd(),
            &mut headers,
            &slices,
            &addrs,
            [],
            MsgFlags::empty(),
        ) {
            Ok(results) => {
                let n = results.count();
                sent += n;
                next += n.max(1);
                if n == 0 {
                    on_error(rest[0], io::Error::other("not sent"));
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => {
                // The first datagram of the rest failed: skip it, keep the others.
                on_error(rest[0], io::Error::from(errno));
                next += 1;
            }
        }
    }
    sent
}

/// Receive slots per [`recv_batch`] call.
pub const RECV_BATCH: usize = 32;

/// Reusable space for [`recv_batch`]: one 64 KiB buffer per slot (no datagram is cut).
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
    lens: Vec<usize>,
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
            headers: nix::sys::socket::MultiHeaders::preallocate(RECV_BATCH, None),
            lens: Vec::with_capacity(RECV_BATCH),
        }
    }
}

impl RecvBatch {
    /// Receives up to [`RECV_BATCH`] datagrams in one system call (recvmmsg). With `wait`,
    /// blocks until at least one is there and then takes what else is queued
    /// (MSG_WAITFORONE); without, returns at once (MSG_DONTWAIT). Returns how many arrived;
    /// read them with [`RecvBatch::datagram`].
    ///
    /// # Errors
    ///
    /// The system call's error; `WouldBlock` when nothing was queued and `wait` was false.
    pub fn recv(&mut self, socket: &UdpSocket, wait: bool) -> io::Result<usize> {
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{MsgFlags, recvmmsg};

        let flags = if wait {
            MsgFlags::MSG_WAITFORONE
        } else {
            MsgFlags::MSG_DONTWAIT
        };
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        self.lens.clear();
        let results = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            flags,
            None,
        )
        .map_err(io::Error::from)?;
        self.lens.extend(results.map(|r| r.bytes));
        Ok(self.lens.len())
    }

    /// The `i`-th datagram of the last [`RecvBatch::recv`].
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
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
