//! temporary
#![allow(missing_docs)]
use std::sync::Arc;
use smr_node::nbd::{BlockDevice, Export, NbdServer};
struct Z(u64);
impl BlockDevice for Z {
    fn size(&self) -> u64 { self.0 }
    fn read_at(&self, _o: u64, buf: &mut [u8]) -> std::io::Result<()> { buf.fill(7); Ok(()) }
}
#[test]
fn bench() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let s = NbdServer::new(vec![Export::new("z", Arc::new(Z(2 << 30)))]).unwrap();
    let h = s.spawn_tcp(l).unwrap();
    for args in [vec![], vec!["--connections=4", "--requests=64"]] {
        let t = std::time::Instant::now();
        let st = std::process::Command::new("nbdcopy").args(&args).arg(format!("nbd://{addr}")).arg("null:").status().unwrap();
        assert!(st.success());
        let e = t.elapsed().as_secs_f64();
        eprintln!("{args:?}: 2 GiB in {e:.2}s = {:.0} MiB/s", 2048.0 / e);
    }
    h.stop().unwrap();
}
