//! Generates bindings for the ggml/gguf headers of the ggml that `llama-cpp-sys-2`
//! built (and installed into its OUT_DIR), or of an installed ggml named by
//! `GGML_INCLUDE_DIR` when the `system-ggml` feature is on.
use std::env;
use std::path::PathBuf;

const HEADERS: [&str; 5] = [
    "ggml.h",
    "ggml-backend.h",
    "ggml-alloc.h",
    "ggml-cpu.h",
    "gguf.h",
];

fn include_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=GGML_INCLUDE_DIR");
    if let Ok(dir) = env::var("GGML_INCLUDE_DIR") {
        return PathBuf::from(dir);
    }
    // llama-cpp-sys-2 (links = "llama") exports the CMake package dir of the ggml it
    // installed: <out>/lib/cmake. The headers sit in <out>/include.
    let cmake_dir = env::var("DEP_LLAMA_GGML_CMAKE_DIR").expect(
        "ggml-sys: llama-cpp-sys-2 did not report where it installed ggml; \
         set GGML_INCLUDE_DIR to the directory that holds ggml.h",
    );
    PathBuf::from(cmake_dir).join("../../include")
}

fn main() {
    let include = include_dir();
    let mut builder = bindgen::Builder::default()
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_item("ggml_.*")
        .allowlist_item("gguf_.*")
        .allowlist_item("GGML_.*")
        .allowlist_item("GGUF_.*")
        .blocklist_type("FILE")
        .raw_line("pub type FILE = ::core::ffi::c_void;")
        .derive_default(true)
        .prepend_enum_name(false)
        .layout_tests(false);
    for header in HEADERS {
        let path = include.join(header);
        assert!(path.exists(), "ggml-sys: {} not found", path.display());
        println!("cargo:rerun-if-changed={}", path.display());
        builder = builder.header(path.to_string_lossy());
    }
    let bindings = builder.generate().expect("ggml-sys: bindgen failed");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings
        .write_to_file(out)
        .expect("ggml-sys: cannot write bindings");
}
