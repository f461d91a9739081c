//! Dataset readers: LLaMA-Factory sharegpt, R1-Onevision rows, synthetic verifiable tasks
