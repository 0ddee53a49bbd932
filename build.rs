//! Compiles `proto/echo.proto` for the example backends, tests and benchmarks, with its
//! descriptor set (served by the example backend's reflection service).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("echo_descriptor.bin"))
        .compile_protos(&["proto/echo.proto"], &["proto"])?;
    Ok(())
}
