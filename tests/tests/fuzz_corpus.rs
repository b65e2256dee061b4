//! Replays the committed fuzzing corpus (`fuzz/corpus/<target>/`) through the fuzz targets'
//! checks on the stable toolchain, so what fuzzing once found stays fixed (see FUZZING in
//! BENCHMARKS.md for how the corpus was grown).

#[path = "../../fuzz/bodies.rs"]
mod bodies;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("the corpus {} is missing: {error}", dir.display()));
    let mut replayed = 0;
    for entry in entries {
        let path = entry.expect("a readable corpus entry").path();
        let data = std::fs::read(&path).expect("a readable corpus file");
        check(&data);
        replayed += 1;
    }
    assert!(replayed > 0, "the corpus {} is empty", dir.display());
    println!("{target}: {replayed} inputs replayed");
}

#[test]
fn envelope_corpus() {
    replay("envelope", bodies::envelope);
}

#[test]
fn signature_corpus() {
    replay("signature", bodies::signature);
}

#[test]
fn state_corpus() {
    replay("state", bodies::state);
}

#[test]
fn config_corpus() {
    replay("config", bodies::config);
}
