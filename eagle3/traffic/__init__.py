"""Served traffic: records, capture to S3, and the traffic data source."""
