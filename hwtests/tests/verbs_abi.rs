//! Our `repr(C)` verbs declarations against the installed rdma-core headers:
//! the same sizeof/offsetof expressions compiled by the system C compiler.

use std::io::Write;
use std::process::{Command, Stdio};

use quiver_fabric::verbs::abi_layout;

#[test]
fn our_verbs_declarations_match_the_installed_headers() {
    let layout = abi_layout();
    let mut source = String::from("#include <stdio.h>\n#include <stddef.h>\n#include <infiniband/verbs.h>\nint main(void) {\n");
    for (expr, _) in &layout {
        source.push_str(&format!("    printf(\"%zu\\n\", (size_t)({expr}));\n"));
    }
    source.push_str("    return 0;\n}\n");
    let dir = std::env::temp_dir().join(format!("quiver-verbs-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("abi");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let compile = Command::new(&compiler)
        .args(["-x", "c", "-", "-o"])
        .arg(&exe)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = compile else {
        quiver_hwtests::skip("verbs ABI", &format!("no C compiler ({compiler})"));
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(source.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("infiniband/verbs.h") && err.contains("No such file") {
            quiver_hwtests::skip(
                "verbs ABI",
                "infiniband/verbs.h not installed (Debian: libibverbs-dev)",
            );
            return;
        }
        panic!("compiling the ABI probe failed:\n{err}");
    }
    let printed = Command::new(&exe).output().unwrap();
    let values: Vec<usize> = String::from_utf8_lossy(&printed.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(values.len(), layout.len());
    let mut mismatches = Vec::new();
    for ((expr, ours), theirs) in layout.iter().zip(&values) {
        if ours != theirs {
            mismatches.push(format!("{expr}: ours {ours}, verbs.h {theirs}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
    println!(
        "verbs ABI: {} sizes and offsets match the installed headers",
        layout.len()
    );
}
