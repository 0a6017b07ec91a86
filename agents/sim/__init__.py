"""The simulated fleet: a scenario engine and the NVMLs that serve it, apart from the agent.

`spec` reads scenario files, `hardware` compiles their GPUs, `generator` draws deterministic
noise, `jobs` times and loads the jobs, `engine` (`Scenario`) answers what NVML reports and
which events are published at any time; `nvml` serves it through pynvml's API and `libnvml/`
as a C-ABI `libnvidia-ml.so.1`. The node agent imports none of it except to `--simulate`.
"""
