//! The library side of the `llmft` command: the layered configuration, so
//! that tests and fuzz targets outside the binary can load configs exactly
//! as `llmft` does.
pub mod config;
