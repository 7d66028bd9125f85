"""CPU kernels that XLA lacks, as XLA FFI custom calls compiled on first use (a leaf layer, like
`pdx.kernels_pallas`): today `gemv`, the bf16- and int8-weight matrix-vector products of small-batch decode."""
