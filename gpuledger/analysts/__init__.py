"""Analysts' answers: the FOCUS export, recommendations with dollars, the HTML
report and the cost logged back to MLflow runs. Decisions are pure functions; the modules'
`fetch_*`/`load_*` functions are the I/O at the edges (parameterized SQL only)."""
