//! Configuration: the TOML model, matrix expansion and validation with file:line:column errors.

mod model;

pub use model::*;
