//! Tensors, the Backend trait with its CPU implementation, and the Qwen2.5-VL model
