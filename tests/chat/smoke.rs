use crate::support::*;

#[test]
fn smoke() {
    let server = default_server();
    let (mut ws, me) = join(server.local_addr());
    send(&mut ws, "hi");
    assert_eq!(recv_text(&mut ws), format!("{me}: hi"));
    assert_eq!(server.client_count(), 1);
    server.shutdown().expect("clean shutdown");
}
