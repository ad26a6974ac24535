//! The `forwarder` path: a plain one-hop UDP forwarder, our stand-in for samplicator. One
//! blocking socket with large buffers; one `recv` and one `send_to` per datagram, nothing
//! else. It runs as a process of its own (`relay-perf forward`), so its CPU and memory are
//! measured like the relay's.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};

/// Options of `relay-perf forward`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ForwardArgs {
    /// Where to send each datagram.
    #[arg(long)]
    to: SocketAddr,
    /// SO_RCVBUF and SO_SNDBUF to ask for, bytes (capped by net.core.rmem_max/wmem_max).
    #[arg(long, default_value_t = 8 << 20)]
    buffer: usize,
}

/// Binds 127.0.0.1:0, prints `forwarder listening on ADDR` and forwards until killed.
pub(crate) fn run(args: &ForwardArgs) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind forwarder");
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(args.buffer);
    let _ = sock.set_send_buffer_size(args.buffer);
    let addr = socket.local_addr().expect("forwarder address");
    println!("forwarder listening on {addr}");
    let _ = std::io::stdout().flush();
    let mut buf = vec![0u8; 65_536];
    loop {
        match socket.recv(&mut buf) {
            // A refused send (nothing listening yet) loses that datagram, as samplicator would.
            Ok(n) => {
                let _ = socket.send_to(&buf[..n], args.to);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("forwarder: recv: {e}"),
        }
    }
}
