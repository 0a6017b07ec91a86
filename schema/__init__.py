"""The contract in code: messages, topics, ClickHouse migrations, the price book."""
