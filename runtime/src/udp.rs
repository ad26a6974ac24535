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
    if let Some(want) = buffers.recv {
        // Failure to set is not fatal: the read-back below reports what we got.
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
    socket.set_nonblocking(true)?;
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
    socket.set_nonblocking(true)?;
    Ok(socket.into())
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
