"""The command line's commands (faxgw jobs/job/resend/cancel/report/check-config,
received/receive-sample), above everything they call."""
