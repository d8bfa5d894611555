-- What a call cost in the service's weighted unit (tokens, …), as the executor reports it on the
-- result (reported by the service, else estimated). Null when the service has no cost limit.
-- Double precision: a u64 count of units, exact up to 2^53, and summable without casts.
alter table action_results add column if not exists cost double precision;
