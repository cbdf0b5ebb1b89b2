//! Embeds every `cuda/*.cu` file (each prefixed with `cuda/common.cuh`) into the crate.
use std::{env, fs, path::PathBuf};

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("cuda");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            println!("cargo:rerun-if-changed={}", p.display());
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    let mut out = String::from("/// Every kernel source of the crate, sorted by name.\npub static SOURCES: &[KernelSource] = &[\n");
    for n in &names {
        out.push_str(&format!(
            "    KernelSource {{ name: {n:?}, code: concat!(include_str!({common:?}), \"\\n#line 1 \\\"{n}.cu\\\"\\n\", include_str!({file:?})) }},\n",
            common = dir.join("common.cuh").display().to_string(),
            file = dir.join(format!("{n}.cu")).display().to_string(),
        ));
    }
    out.push_str("];\n");
    fs::write(
        PathBuf::from(env::var("OUT_DIR").unwrap()).join("sources.rs"),
        out,
    )
    .unwrap();
}
