"""Grafana as code (ARCHITECTURE.md §1): the *GPU fleet live* and *GPU cost explorer* dashboards,
alert rules, provisioning files and the sync to a Grafana server, built with
grafana-foundation-sdk for the ClickHouse data source plugin.

`gpuledger grafana export DIR` writes the files; `gpuledger grafana sync` pushes them.
"""
