"""What an operator runs the service with: metrics (`metrics`, `endpoints`), admission and
readiness (`readiness`), structured logs (`logs`)."""
