//! Faults on the real servers: kill -9 and restart, a stopped server, a tiny oplog,
//! fail points.

use crate::Check;

pub fn checks() -> Vec<Check> {
    Vec::new()
}
