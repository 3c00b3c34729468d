"""CQIL across processes on torch.distributed (DESIGN.md section 8), and tensor parallelism to compare with.

launch: process group and failure handling; per_rank: the per-rank CQIL schedule and weight sharding;
tensor_parallel: the TP baseline; bench: the interleaved latency run. What each rank runs (the torchrun
entry) is orchestration: pipeline/rank_worker.py.
"""
