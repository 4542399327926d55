-- Broad queries. Ranking every match by text relevance costs time in proportion to the number
-- of matches (a word in a third of a million tracks takes ~300 ms). So search first estimates
-- how many tracks a query matches, from per-word document counts, and a broad query is answered
-- in popularity order straight from idx_tracks_play_count_desc, which stops after one page.

-- How many tracks hold each word: exact after a bulk load or a refresh (ts_stat), and at least 1
-- for a word that arrived since (the trigger adds new words with ndoc 1).
ALTER TABLE search_words ADD COLUMN ndoc bigint NOT NULL DEFAULT 1;
CREATE INDEX idx_search_words_prefix ON search_words (word text_pattern_ops);
UPDATE search_words w SET ndoc = s.ndoc
FROM ts_stat('SELECT search_tsv FROM tracks') s
WHERE s.word = w.word;

-- What people type -> (tsquery, estimated matches). Each typed word becomes a term: joined like
-- the indexed words ("AC/DC" -> acdc), the last one a prefix (search as you type), and a word of
-- 5+ letters the catalog does not know is OR'ed with up to five known words within one typo
-- (trigram KNN over search_words, then edit distance; a swap counts as one typo). The estimate
-- of an AND of terms is the smallest term's count.
CREATE OR REPLACE FUNCTION edge_search_plan(q text, OUT tsq tsquery, OUT estimate bigint)
    LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    words text[];
    w text;
    alternatives text[];
    alternatives_n bigint;
    term text;
    n bigint;
    terms text[] := '{}';
    i integer := 0;
    prefix boolean;
BEGIN
    words := array(SELECT x FROM regexp_split_to_table(edge_fold(coalesce(q, '')), '\s+') AS x
                   WHERE x <> '');
    FOREACH w IN ARRAY words LOOP
        i := i + 1;
        w := regexp_replace(w, '[^[:alnum:]]+', '', 'g');
        CONTINUE WHEN w = '';
        prefix := i = cardinality(words) AND length(w) >= 3;
        term := quote_literal(w) || CASE WHEN prefix THEN ':*' ELSE '' END;
        IF prefix THEN
            SELECT coalesce(sum(ndoc), 0) INTO n FROM search_words
            WHERE word LIKE w || '%';  -- w holds only letters and digits: no LIKE wildcards
        ELSE
            SELECT coalesce(max(ndoc), 0) INTO n FROM search_words WHERE word = w;
        END IF;
        IF length(w) >= 5 AND NOT EXISTS (SELECT 1 FROM search_words WHERE word = w) THEN
            -- Up to five known words within one typo, most similar first: "smmer" may be
            -- "summer" or "smme", and the searcher should find either.
            SELECT array_agg(k.word), coalesce(sum(k.ndoc), 0)
            INTO alternatives, alternatives_n
            FROM (SELECT c.word, c.ndoc
                  FROM (SELECT word, ndoc FROM search_words ORDER BY word <-> w LIMIT 100) AS c
                  WHERE length(c.word) BETWEEN length(w) - 1 AND length(w) + 1
                    AND edge_one_typo(c.word, w)
                  ORDER BY similarity(c.word, w) DESC, c.word
                  LIMIT 5) AS k;
            IF alternatives IS NOT NULL THEN
                term := '(' || term || ' | ' || array_to_string(
                    array(SELECT quote_literal(a) FROM unnest(alternatives) AS a), ' | ') || ')';
                n := n + alternatives_n;
            END IF;
        END IF;
        terms := terms || term;
        estimate := least(coalesce(estimate, n), n);
    END LOOP;
    IF cardinality(terms) = 0 THEN
        tsq := NULL;
        estimate := 0;
        RETURN;
    END IF;
    tsq := to_tsquery('simple', array_to_string(terms, ' & '));
END $$;

-- The one query language: edge_search_query is the plan's tsquery.
CREATE OR REPLACE FUNCTION edge_search_query(q text) RETURNS tsquery
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (edge_search_plan(q)).tsq;

-- The tracks of a broad query in popularity order: walk idx_tracks_play_count_desc and keep
-- the matches; one page costs about (page size x catalog / matches) index entries. The SET
-- clauses keep the planner from the bitmap-and-sort plan a generic plan would pick.
CREATE OR REPLACE FUNCTION edge_search_by_popularity(
    q tsquery, after_plays bigint, after_id bigint, n integer
) RETURNS TABLE (play_count bigint, id bigint)
    LANGUAGE sql STABLE
    SET enable_bitmapscan = off
    SET enable_sort = off
AS $$
    SELECT t.play_count, t.id FROM tracks t
    WHERE t.search_tsv @@ q AND (t.play_count, t.id) < (after_plays, after_id)
    ORDER BY t.play_count DESC, t.id DESC
    LIMIT n
$$;
