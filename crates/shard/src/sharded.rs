//! The FSDP sharded weight store (being written).
