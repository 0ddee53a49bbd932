//! Compiles `proto/echo.proto` for the example backends, tests and benchmarks (cargo feature
//! `demo`); the proxy's own builds need neither the generated code nor `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "demo")]
    {
        println!("cargo:rerun-if-changed=proto/echo.proto");
        tonic_prost_build::configure().compile_protos(&["proto/echo.proto"], &["proto"])?;
    }
    #[cfg(not(feature = "demo"))]
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
