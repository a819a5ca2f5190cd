fn main() {
    std::process::exit(asiffs::cli::main());
}
