//! Create an image, write, discard and read it back, then print its map.
//!
//!     cargo run --release --example roundtrip [PATH]

use asiffs::{CreateOptions, Image, OpenOptions};

fn main() -> asiffs::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/asiffs-example.asif".into());
    let opts = CreateOptions {
        size: 64 << 30,
        force: true,
        ..Default::default()
    };
    let img = Image::create(&path, &opts)?;

    // 3 MiB of data starting inside the first chunk, then the whole second
    // chunk discarded: it becomes unmapped and its space goes back.
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 512 << 10)?;
    img.discard(1 << 20, 1 << 20)?;
    img.flush()?;
    img.close()?;

    let img = Image::open(&path, &OpenOptions::default())?;
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 512 << 10)?;
    let hole = (512 << 10)..(1536 << 10);
    for (i, (&got, &wrote)) in back.iter().zip(&data).enumerate() {
        let want = if hole.contains(&i) { 0 } else { wrote };
        assert_eq!(got, want, "byte {i} differs");
    }
    println!(
        "{path}: {} bytes virtual, {} bytes allocated",
        img.size(),
        img.allocated_bytes()?
    );
    for e in img.extents()? {
        println!(
            "{:>12} +{:<12} {}",
            e.start,
            e.length,
            if e.data { "data" } else { "zero" }
        );
    }
    Ok(())
}
