//! Compiles the XDP steering programs (src/io/afxdp/steer.bpf.c) with clang
//! into OUT_DIR/steer.bpf.o, which io::afxdp embeds and loads.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/io/afxdp/steer.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("steer.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // <asm/types.h> lives under the multiarch include directory, which
    // clang does not search for the BPF target.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-I", &multiarch, "-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile {src} ({s}); run scripts/bootstrap"),
        Err(e) => panic!("cannot run {clang} to compile {src}: {e}; run scripts/bootstrap (installs clang)"),
    }
}
