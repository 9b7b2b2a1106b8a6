//! Marks the build when `INTRACOM_TEST_MONGODB_URI` is set, so the real-server tests
//! run; without it they are reported as ignored (with the reason), never as passed.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(intracom_mongodb_tests)");
    println!("cargo:rerun-if-env-changed=INTRACOM_TEST_MONGODB_URI");
    if std::env::var_os("INTRACOM_TEST_MONGODB_URI").is_some_and(|v| !v.is_empty()) {
        println!("cargo:rustc-cfg=intracom_mongodb_tests");
    }
}
