"""Test-suite set-up: 8 fake CPU devices, set before JAX initialises its backend; glibc's default heap."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# `import jaxpeft` would keep each process's peak heap (jaxpeft/cpu_heap.py): right for one training run, but
# the suite compiles hundreds of programs in two long-lived processes. tests/cpu_heap_test.py turns it on.
os.environ.setdefault("JAXPEFT_CPU_HEAP", "0")
