//! Where a test server is not mongod, shown by a test.
//!
//! A conformance case or check is excluded on one server only for a divergence of
//! that server from mongod's documented behaviour (DESIGN §7). Each divergence listed
//! here names the cases it breaks and comes with a test that passes while the
//! divergence still exists: the day the server is fixed, that test fails, and the
//! exclusion goes.

use libtest_mimic::Trial;

use crate::servers::Kind;

/// Why `case` is excluded on `kind`, if it is.
pub fn excluded(_kind: Kind, _case: &str) -> Option<&'static str> {
    None
}

/// The tests that show each listed divergence still exists.
pub fn trials() -> Vec<Trial> {
    Vec::new()
}
