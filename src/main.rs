//! The `ringfeed` command line: parses flags, calls the library, renders errors for humans.
fn main() {}
