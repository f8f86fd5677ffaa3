"""Jobs over a loaded model: the batch job, and the request parsing it shares with the server."""
