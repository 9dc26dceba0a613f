//! The `tailor` command line: one module per subcommand.

pub mod copy;
pub mod portable;
pub mod prune;
pub mod work;
