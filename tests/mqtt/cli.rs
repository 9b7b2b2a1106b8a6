use crate::Check;

pub fn checks() -> Vec<Check> {
    vec![]
}
