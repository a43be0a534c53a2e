//! A TLS handshake between two rustls connections in memory: no sockets, no runtime,
//! so a benchmark sees the handshake's CPU cost and nothing else.

use rustls::Connection;

/// Moves bytes between the two sides until neither is handshaking (the server has
/// then checked the client's certificate and Finished).
pub fn handshake(client: &mut Connection, server: &mut Connection) -> Result<(), rustls::Error> {
    let mut wire = Vec::with_capacity(8 * 1024);
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        transfer(&mut wire, client, server)?;
        transfer(&mut wire, server, client)?;
    }
    Err(rustls::Error::General("handshake did not converge".into()))
}

fn transfer(
    wire: &mut Vec<u8>,
    from: &mut Connection,
    to: &mut Connection,
) -> Result<(), rustls::Error> {
    let io = |e: std::io::Error| rustls::Error::General(e.to_string());
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).map_err(io)?;
    }
    let mut unread = wire.as_slice();
    while !unread.is_empty() {
        to.read_tls(&mut unread).map_err(io)?;
        to.process_new_packets()?;
    }
    Ok(())
}
