"""CPU kernels that XLA lacks, as XLA FFI custom calls compiled on first use (a leaf layer, like
`pdx.kernels_pallas`): today `gemv`, the bf16-weight matrix-vector product of small-batch decode."""
