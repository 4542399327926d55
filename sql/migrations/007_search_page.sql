-- Search in one statement, with a cost that no longer grows with the number of matches.
--
-- Until now a search was two round trips (edge_search_plan, then the page). A query estimated
-- below EDGE_SEARCH_BROAD_MATCHES ranked every match with ts_rank: each match is a heap row, so
-- a query matching 15,000 tracks cost ~40 ms whatever the page. And the popularity walk of a
-- broad query (006) read the heap row of every entry it passed: ~3 us each, ~100 ms a page for
-- an AND of two common words that in fact matches 1 track in 2,000.
--
-- Now a first page chooses one of three orders, and every later page follows it (the cursor
-- says which):
--   ranked   ts_rank (title > artist > album, occurrences, word distance), then popularity:
--            queries matching few tracks, where scoring each match is cheap;
--   tiers    matches in the title, then in the title and artist, then those that need the
--            album; in each tier by popularity: queries matching thousands of tracks;
--   popular  by popularity: broad queries (EDGE_SEARCH_BROAD_MATCHES), as in 006.
-- A page of tiers or popular costs one page of an index walk, or, for a tier too sparse to walk,
-- a bitmap over that tier's own index, which is small because the tier is.
-- edge_search_by_popularity (006) is no longer called; it stays for servers that still run the
-- previous version during a deploy.

-- Can a track's search vector ride along in a btree entry? An entry holds at most 2,704 bytes.
-- A tsvector's binary form is at most ~4 bytes a word longer than its text form, which spends at
-- least 7 characters a word, so 1,500 characters of text leave room. Real names are far below it
-- (the longest in a 1M synthetic catalog is 263); a track above it is walked from the second
-- index below instead of failing its INSERT.
CREATE FUNCTION edge_search_tsv_fits(tsv tsvector) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    RETURN octet_length(tsv::text) <= 1500;

-- Popularity order with the search vector in the entry: a walk tests each track in the index
-- (index-only: sequential leaf pages, ~0.25 us an entry, against ~3 us for a heap row).
CREATE INDEX idx_tracks_play_count_search ON tracks (play_count DESC, id DESC)
    INCLUDE (search_tsv) WHERE edge_search_tsv_fits(search_tsv);
-- The tracks left out of it, in the same order (normally none).
CREATE INDEX idx_tracks_play_count_search_rest ON tracks (play_count DESC, id DESC)
    WHERE NOT edge_search_tsv_fits(search_tsv);

-- The words of each field on their own, to find the members of a sparse tier without reading
-- every match: title (A), artist (B), album (C), as edge_track_tsv weights them.
CREATE INDEX idx_tracks_search_title ON tracks USING gin (ts_filter(search_tsv, '{a}'));
CREATE INDEX idx_tracks_search_artist ON tracks USING gin (ts_filter(search_tsv, '{b}'));
CREATE INDEX idx_tracks_search_album ON tracks USING gin (ts_filter(search_tsv, '{c}'));

-- q with every word restricted to the given weights: 'a' & 'b':* -> 'a':AB & 'b':*AB. For the
-- queries edge_search_plan makes (words joined by & and |), tsv @@ edge_tsquery_weighted(q, 'A')
-- holds exactly when ts_filter(tsv, '{a}') @@ q does.
CREATE FUNCTION edge_tsquery_weighted(q tsquery, weights text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    RETURN regexp_replace(q::text, '(''(?:[^'']|'''')*'')(?::(\*))?', '\1:\2' || weights, 'g')
        ::tsquery;

-- Any word of q: 'a' & ('b' | 'c') -> 'a' | 'b' | 'c'. A track that matches q in the title and
-- artist but not in the title alone has one of q's words in the artist, so it is among the
-- tracks whose artist matches this.
CREATE FUNCTION edge_tsquery_any(q tsquery) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    RETURN replace(q::text, ' & ', ' | ')::tsquery;  -- the words are letters and digits only

-- Tracks in popularity order after (after_plays, after_id), at most `budget` of them (NULL: no
-- bound), with their search vectors: from the covering index, merged with the few too long for
-- it. Inlined into the functions below (so not STRICT, and no SET clause of its own).
CREATE FUNCTION edge_tracks_by_plays(after_plays bigint, after_id bigint, budget bigint)
    RETURNS TABLE (play_count bigint, id bigint, search_tsv tsvector)
    LANGUAGE sql STABLE
AS $$
    SELECT s.play_count, s.id, s.search_tsv
    FROM ((SELECT t.play_count, t.id, t.search_tsv FROM tracks t
           WHERE edge_search_tsv_fits(t.search_tsv)
             AND (t.play_count, t.id) < (after_plays, after_id)
           ORDER BY t.play_count DESC, t.id DESC)
          UNION ALL
          (SELECT t.play_count, t.id, t.search_tsv FROM tracks t
           WHERE NOT edge_search_tsv_fits(t.search_tsv)
             AND (t.play_count, t.id) < (after_plays, after_id)
           ORDER BY t.play_count DESC, t.id DESC)) AS s
    ORDER BY s.play_count DESC, s.id DESC
    LIMIT budget
$$;

-- The first n tracks that match q_in and not q_out (NULL: no exclusion), in popularity order
-- after (after_plays, after_id), among at most `budget` tracks (NULL: no bound). Fewer than n
-- rows with a budget means "not within the first `budget` tracks". The SET clauses keep the
-- planner on the index walk: a function's statements are planned without the parameters'
-- values, and the bitmap-and-sort plan it would pick instead reads every match.
CREATE FUNCTION edge_search_walk(
    q_in tsquery, q_out tsquery, after_plays bigint, after_id bigint, n integer, budget bigint
) RETURNS TABLE (play_count bigint, id bigint)
    LANGUAGE sql STABLE
    SET enable_bitmapscan = off
    SET enable_sort = off
AS $$
    SELECT w.play_count, w.id
    FROM edge_tracks_by_plays(after_plays, after_id, budget) AS w
    WHERE w.search_tsv @@ q_in AND NOT coalesce(w.search_tsv @@ q_out, false)
    ORDER BY w.play_count DESC, w.id DESC
    LIMIT n
$$;

-- Every match of q among the `budget` most popular tracks, with its tier: 3 if q_title (q in
-- the title) matches, 2 if q_title_artist does, else 1.
CREATE FUNCTION edge_search_census(
    q tsquery, q_title tsquery, q_title_artist tsquery, budget bigint
) RETURNS TABLE (tier integer, play_count bigint, id bigint)
    LANGUAGE sql STABLE
    SET enable_bitmapscan = off
    SET enable_sort = off
AS $$
    SELECT CASE WHEN w.search_tsv @@ q_title THEN 3
                WHEN w.search_tsv @@ q_title_artist THEN 2
                ELSE 1 END,
           w.play_count, w.id
    FROM edge_tracks_by_plays(9223372036854775807, 9223372036854775807, budget) AS w
    WHERE w.search_tsv @@ q
    ORDER BY w.play_count DESC, w.id DESC
$$;

-- What people type -> (tsquery, estimated matches, index query), as 006 did, plus:
-- - index_tsq, what to look up in the GIN indexes: tsq without its last word when that word is a
--   prefix matching over 50 times more tracks than the rarest other word. GIN collects every
--   track of every word a prefix expands to before it intersects ("ber" is 379,000 tracks:
--   ~30 ms), where the rare word's few hundred tracks, each tested against tsq, cost ~4 ms.
-- - btree lookups in search_words. Written as = and LIKE, they went to the trigram GiST index,
--   which the planner rates the same but which costs ~200 us a lookup against ~20 us.
DROP FUNCTION edge_search_query(text);
DROP FUNCTION edge_search_plan(text);
CREATE FUNCTION edge_search_plan(
    q text, OUT tsq tsquery, OUT estimate bigint, OUT index_tsq tsquery
) LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    words text[];
    w text;
    alternatives text[];
    alternatives_n bigint;
    term text;
    n bigint;
    known boolean;
    terms text[] := '{}';
    counts bigint[] := '{}';
    i integer := 0;
    k integer;
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
        SELECT max(s.ndoc) INTO n FROM search_words s WHERE s.word >= w AND s.word <= w;
        known := n IS NOT NULL;
        IF prefix THEN
            -- The words from w up to w with its last letter incremented: those starting with w.
            SELECT sum(s.ndoc) INTO n FROM search_words s
            WHERE s.word ~>=~ w
              AND s.word ~<~ (left(w, -1) || chr(ascii(right(w, 1)) + 1))
              AND starts_with(s.word, w);
        END IF;
        n := coalesce(n, 0);
        IF length(w) >= 5 AND NOT known THEN
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
        counts := counts || n;
    END LOOP;
    k := cardinality(terms);
    IF k = 0 THEN
        tsq := NULL;
        estimate := 0;
        index_tsq := NULL;
        RETURN;
    END IF;
    -- An AND of words matches at most as many tracks as its rarest word.
    estimate := (SELECT min(c) FROM unnest(counts) AS c);
    tsq := to_tsquery('simple', array_to_string(terms, ' & '));
    index_tsq := tsq;
    IF prefix AND k > 1
       AND counts[k] > 50 * (SELECT min(c) FROM unnest(counts[1:k - 1]) AS c) THEN
        index_tsq := to_tsquery('simple', array_to_string(terms[1:k - 1], ' & '));
    END IF;
END $$;

-- The one query language: edge_search_query is the plan's tsquery.
CREATE FUNCTION edge_search_query(q text) RETURNS tsquery
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (edge_search_plan(q)).tsq;

-- One page of search results, plan included. `list` is NULL for a first page, else the order
-- the cursor came from: 'ranked' (after_rank = ts_rank), 'tiers' (after_rank = tier, 3 to 1) or
-- 'popular'; after_plays and after_id complete the cursor.
--
-- A first page estimated to match at least broad_matches tracks is listed by popularity if a
-- page of matches turns up within the `budget` most popular tracks; one estimated at least
-- tier_matches is listed by tiers if the census of those tracks holds a page. If not, the
-- estimate was far too high (for an AND of words it is the rarest word's count) and the few
-- matches are ranked; walking on would cost more the fewer matches there are.
--
-- Every statement that reads through a GIN index looks up index_tsq there and tests tsq with
-- ts_match_vq: the function form of @@, which the planner does not take to an index. The
-- OFFSET 0 fences keep the planner on the GIN bitmap: through them it can neither walk an index
-- in popularity order (what a sparse tier just proved too slow) nor take the cursor's bound to
-- idx_tracks_play_count_desc; and a ts_rank is computed once a row, not again for the bound.
CREATE FUNCTION edge_search_page(
    q text, list text, after_rank real, after_plays bigint, after_id bigint, n integer,
    tier_matches bigint, broad_matches bigint, budget bigint
) RETURNS TABLE (list_kind text, rank real, play_count bigint, id bigint)
    LANGUAGE plpgsql STABLE
    -- Each page's tsquery is different: plan the statements below for it, never generically.
    SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    tsq tsquery;
    estimate bigint;
    index_tsq tsquery;
    q_title tsquery;
    q_title_artist tsquery;
    census_tiers integer[];
    census_plays bigint[];
    census_ids bigint[];
    plays bigint[];
    ids bigint[];
    tier integer;
    found_n integer;
    need integer := n;
BEGIN
    SELECT p.tsq, p.estimate, p.index_tsq INTO tsq, estimate, index_tsq
    FROM edge_search_plan(q) AS p;
    IF tsq IS NULL THEN
        RETURN;
    END IF;
    q_title := edge_tsquery_weighted(tsq, 'A');
    q_title_artist := edge_tsquery_weighted(tsq, 'AB');

    IF list IS NULL AND estimate >= broad_matches THEN
        SELECT array_agg(w.play_count ORDER BY w.play_count DESC, w.id DESC),
               array_agg(w.id ORDER BY w.play_count DESC, w.id DESC)
        INTO plays, ids
        FROM edge_search_walk(tsq, NULL, after_plays, after_id, n, budget) AS w;
        IF cardinality(ids) = n THEN
            RETURN QUERY SELECT 'popular', NULL::real, u.play_count, u.id
                FROM unnest(plays, ids) WITH ORDINALITY AS u(play_count, id, i)
                ORDER BY u.i;
            RETURN;
        END IF;
    ELSIF list IS NULL AND estimate >= tier_matches THEN
        SELECT array_agg(c.tier ORDER BY c.play_count DESC, c.id DESC),
               array_agg(c.play_count ORDER BY c.play_count DESC, c.id DESC),
               array_agg(c.id ORDER BY c.play_count DESC, c.id DESC)
        INTO census_tiers, census_plays, census_ids
        FROM edge_search_census(tsq, q_title, q_title_artist, budget) AS c;
        IF cardinality(census_ids) >= n THEN
            list := 'tiers';
        END IF;
    END IF;

    IF list = 'popular' THEN
        RETURN QUERY SELECT 'popular', NULL::real, w.play_count, w.id
            FROM edge_search_walk(tsq, NULL, after_plays, after_id, n, NULL) AS w;
        RETURN;
    END IF;

    IF list IS DISTINCT FROM 'tiers' THEN
        RETURN QUERY
            SELECT 'ranked', r.score, r.play_count, r.id
            FROM (SELECT t.id, t.play_count,
                         ts_rank('{0.1, 0.3, 0.6, 1.0}', t.search_tsv, tsq) AS score
                  FROM tracks t
                  WHERE t.search_tsv @@ index_tsq AND ts_match_vq(t.search_tsv, tsq)
                  OFFSET 0) AS r
            WHERE (r.score, r.play_count, r.id) < (after_rank, after_plays, after_id)
            ORDER BY r.score DESC, r.play_count DESC, r.id DESC
            LIMIT n;
        RETURN;
    END IF;

    -- Tiers, from the cursor's (3 on a first page) down. A tier's page comes from the census (a
    -- first page) or a walk (a later page) if one of them holds it; if not, the tier is sparse
    -- among popular tracks, and its field's index lists its members.
    tier := CASE WHEN after_rank < 3 THEN after_rank::integer ELSE 3 END;  -- first page: +inf
    WHILE tier >= 1 AND need > 0 LOOP
        IF census_ids IS NOT NULL THEN
            SELECT array_agg(u.play_count ORDER BY u.i), array_agg(u.id ORDER BY u.i)
            INTO plays, ids
            FROM unnest(census_tiers, census_plays, census_ids) WITH ORDINALITY
                AS u(member_of, play_count, id, i)
            WHERE u.member_of = tier;
        ELSE
            SELECT array_agg(w.play_count ORDER BY w.play_count DESC, w.id DESC),
                   array_agg(w.id ORDER BY w.play_count DESC, w.id DESC)
            INTO plays, ids
            FROM edge_search_walk(
                CASE tier WHEN 3 THEN q_title WHEN 2 THEN q_title_artist ELSE tsq END,
                CASE tier WHEN 2 THEN q_title WHEN 1 THEN q_title_artist END,
                after_plays, after_id, need, budget) AS w;
        END IF;
        IF cardinality(ids) >= need THEN
            RETURN QUERY SELECT 'tiers', tier::real, u.play_count, u.id
                FROM unnest(plays[1:need], ids[1:need]) WITH ORDINALITY AS u(play_count, id, i)
                ORDER BY u.i;
        ELSIF tier = 3 THEN
            RETURN QUERY SELECT 'tiers', 3::real, m.play_count, m.id
                FROM (SELECT t.play_count, t.id FROM tracks t
                      WHERE ts_filter(t.search_tsv, '{a}') @@ index_tsq
                        AND ts_match_vq(t.search_tsv, q_title)
                      OFFSET 0) AS m
                WHERE (m.play_count, m.id) < (after_plays, after_id)
                ORDER BY m.play_count DESC, m.id DESC
                LIMIT need;
        ELSIF tier = 2 THEN
            RETURN QUERY SELECT 'tiers', 2::real, m.play_count, m.id
                FROM (SELECT t.play_count, t.id FROM tracks t
                      WHERE ts_filter(t.search_tsv, '{b}') @@ edge_tsquery_any(tsq)
                        AND t.search_tsv @@ index_tsq
                        AND ts_match_vq(t.search_tsv, q_title_artist)
                        AND NOT ts_match_vq(t.search_tsv, q_title)
                      OFFSET 0) AS m
                WHERE (m.play_count, m.id) < (after_plays, after_id)
                ORDER BY m.play_count DESC, m.id DESC
                LIMIT need;
        ELSE
            RETURN QUERY SELECT 'tiers', 1::real, m.play_count, m.id
                FROM (SELECT t.play_count, t.id FROM tracks t
                      WHERE ts_filter(t.search_tsv, '{c}') @@ edge_tsquery_any(tsq)
                        AND t.search_tsv @@ index_tsq
                        AND ts_match_vq(t.search_tsv, tsq)
                        AND NOT ts_match_vq(t.search_tsv, q_title_artist)
                      OFFSET 0) AS m
                WHERE (m.play_count, m.id) < (after_plays, after_id)
                ORDER BY m.play_count DESC, m.id DESC
                LIMIT need;
        END IF;
        GET DIAGNOSTICS found_n = ROW_COUNT;
        need := need - found_n;
        tier := tier - 1;
        after_plays := 9223372036854775807;  -- a lower tier starts at its top
        after_id := 9223372036854775807;
    END LOOP;
END $$;
