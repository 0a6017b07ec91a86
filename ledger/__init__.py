"""The ledger: gpuledger's decisions as pure functions, with no Kafka, ClickHouse or HTTP.

The cost model (`cost`), what each late message re-costs (`state`), cancel and restate
(`restate`), the join's grace and dedup (`joiner`), idle episodes (`idle`) and budgets
(`budgets`). The worker (`gpuledger.streams`), the analysts (`gpuledger.analysts`) and the
command line use them; they import nothing of gpuledger but `gpuledger.schema`.
"""
