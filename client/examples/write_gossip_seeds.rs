//! Writes the seed corpus of the `gossip_packet` fuzz target: packets a small gossip
//! exchange produces, each prefixed with the "tag it" mode byte the target reads.
//!
//! ```sh
//! cargo run -p sluice-client --example write_gossip_seeds
//! ```

use sluice_client::gossip::fuzzing::sample_packets;

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gossip_packet");
    std::fs::create_dir_all(&dir)?;
    let samples = sample_packets();
    for (i, packet) in samples.iter().enumerate() {
        let mut seed = vec![1u8];
        seed.extend_from_slice(packet);
        std::fs::write(dir.join(format!("seed-{i:02}")), seed)?;
    }
    println!("wrote {} seeds to {}", samples.len(), dir.display());
    Ok(())
}
