use kiln_engine::engine::Engine;
use kiln_engine::spec::{DeviceSpec, QuantSpec};
use std::time::Instant;
#[test]
#[ignore]
fn tmp_load() {
    let engine = Engine::for_job("cpu", DeviceSpec::Cpu).unwrap();
    let t = Instant::now();
    let ck = kiln_engine::model::Checkpoint::open(std::path::Path::new("/tmp/rm-05b")).unwrap();
    eprintln!("open {:.2}", t.elapsed().as_secs_f64());
    drop(ck);
    let t = Instant::now();
    let (_cfg, store) =
        kiln_engine::train::load_params(&engine, "/tmp/rm-05b", QuantSpec::Nvfp4Full).unwrap();
    eprintln!("load_params {:.2}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let s = store.with_moments(kiln_engine::spec::MomentsSpec::F32);
    eprintln!("with_moments {:.2}", t.elapsed().as_secs_f64());
    drop(s);
}
