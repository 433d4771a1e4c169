-- Reserved for the relay outbox (outbox, dead letters, events); migrations are numbered
-- without gaps, so this placeholder holds the number until that schema lands here.
SELECT 1;
