//! Compiles `proto/echo.proto` for the example backends, tests and benchmarks (cargo feature
//! `demo`), with its descriptor set (served by the example backend's reflection service);
//! the proxy's own builds need neither the generated code nor `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "demo")]
    {
        println!("cargo:rerun-if-changed=proto/echo.proto");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        tonic_prost_build::configure()
            .file_descriptor_set_path(out.join("echo_descriptor.bin"))
            .compile_protos(&["proto/echo.proto"], &["proto"])?;
    }
    #[cfg(not(feature = "demo"))]
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
