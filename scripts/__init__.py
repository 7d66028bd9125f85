"""The benchmarks and evaluations `pdx bench NAME` / `pdx eval NAME` run (shipped as `pdx.scripts`)."""
