//! Communicator trait: TCP ring all-reduce on CPU, NCCL on GPU
