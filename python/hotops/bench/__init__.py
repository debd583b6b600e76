"""`hotops bench`: every family's cases timed side by side against the peer a user would pick.

Each family module (hotops/bench/<family>.py) exposes

    cases(quick: bool, device: str) -> list[dict]          # the parameter sets to run
    run(params, quick, threads, device) -> core.Result     # check, then time side by side
    plots(results, folder)                                 # optional: extra PNGs (e.g. recall-QPS)

"""

FAMILIES = {
    "infonce": "hotops.bench.infonce",
    "sparse": "hotops.bench.sparse",
    "attention": "hotops.bench.attention",
    "ann": "hotops.bench.ann",
    "codebook": "hotops.bench.codebook",
}
