//! Rule-based GRPO rewards: format, accuracy, IoU, weighted sums, user plug-ins
