#![deny(clippy::undocumented_unsafe_blocks)]

fn main() {
    std::process::exit(asiffs::cli::main());
}
