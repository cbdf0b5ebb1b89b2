//! The NCCL backend (being written).
