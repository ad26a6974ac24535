//! What the crate's unit tests share: a TLS handshake run in memory between a client and a
//! server configuration, so that a test checks what rustls itself decides.

use std::sync::Arc;

use rustls::{ClientConnection, ServerConnection};

/// Runs a handshake in memory between `client` (dialling `server_name`) and `server`; the
/// server's side of the connection once done, or the error of the side that failed.
pub(crate) fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
    server_name: &str,
) -> Result<ServerConnection, rustls::Error> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .expect("a valid server name");
    let mut client = ClientConnection::new(Arc::new(client), name)?;
    let mut server = ServerConnection::new(Arc::new(server))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("write to memory");
        }
        server
            .read_tls(&mut buf.as_slice())
            .expect("read from memory");
        server.process_new_packets()?;
        let mut back = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut back).expect("write to memory");
        }
        client
            .read_tls(&mut back.as_slice())
            .expect("read from memory");
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(server);
        }
    }
    panic!("the handshake did not finish in 10 rounds");
}
