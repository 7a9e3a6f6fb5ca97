/*
 * time.c - ISO-8601 instants <-> microseconds since the Unix epoch (UTC).
 *
 * Parsing accepts, and nothing else:
 *   2026-01-15                           (midnight UTC)
 *   2026-01-15T10:00Z                    (seconds optional)
 *   2026-01-15T10:00:00Z
 *   2026-01-15T10:00:00.123456Z          (1 to 6 fraction digits, '.' or ',')
 *   2026-01-15T10:00:00+02:00            (offsets +HH, +HH:MM, +HHMM, -...)
 *   lower-case 't'/'z', or a space instead of 'T'.
 * A time without a zone is rejected: it is not an instant. Ranges are
 * checked (months, days incl. leap years, hours 0-23, minutes and seconds
 * 0-59, offsets up to 23:59). The calendar arithmetic is done here
 * (days-from-civil), so the TZ environment never matters.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L   /* clock_gettime */
#endif
#include "es_time.h"

#include <string.h>
#include <time.h>

#define USEC_PER_SEC 1000000LL
#define USEC_PER_DAY (86400LL * USEC_PER_SEC)

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;                                /* [0, 399] */
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, int *m, int *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;                             /* [0, 146096] */
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

static int is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int64_t y, int m)
{
    static const int dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : dim[m - 1];
}

/* Reads exactly n digits at *p. */
static int digits(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9')
            return -1;
        v = v * 10 + (c - '0');
    }
    *p += n;
    *out = v;
    return 0;
}

static int bad(es_error *err, const char *text, const char *why)
{
    return es_fail(err, ES_INVALID,
                   "invalid time '%.80s': %s (expected ISO-8601 such as "
                   "2026-01-15T10:00:00Z, 2026-01-15T10:00:00.5+02:00 or "
                   "2026-01-15)", text, why);
}

int es_time_parse(const char *text, int64_t *usec, es_error *err)
{
    const char *p = text;
    int year, mon, day, hour = 0, min = 0, sec = 0, frac = 0;
    int64_t offset = 0;

    if (!text)
        return es_fail(err, ES_INVALID, "no time given");
    if (digits(&p, 4, &year) < 0 || *p++ != '-' || digits(&p, 2, &mon) < 0 ||
        *p++ != '-' || digits(&p, 2, &day) < 0)
        return bad(err, text, "no YYYY-MM-DD date");
    if (mon < 1 || mon > 12)
        return bad(err, text, "month out of range");
    if (day < 1 || day > days_in_month(year, mon))
        return bad(err, text, "day out of range");

    if (*p) {
        if (*p != 'T' && *p != 't' && *p != ' ')
            return bad(err, text, "date not followed by 'T' and a time");
        p++;
        if (digits(&p, 2, &hour) < 0 || *p++ != ':' || digits(&p, 2, &min) < 0)
            return bad(err, text, "no HH:MM time");
        if (*p == ':') {
            p++;
            if (digits(&p, 2, &sec) < 0)
                return bad(err, text, "no seconds after ':'");
            if (*p == '.' || *p == ',') {
                int n = 0;
                p++;
                while (*p >= '0' && *p <= '9') {
                    if (++n > 6)
                        return bad(err, text, "more than 6 fraction digits");
                    frac = frac * 10 + (*p++ - '0');
                }
                if (n == 0)
                    return bad(err, text, "no digits after the decimal point");
                for (; n < 6; n++)
                    frac *= 10;
            }
        }
        if (hour > 23)
            return bad(err, text, "hour out of range");
        if (min > 59)
            return bad(err, text, "minute out of range");
        if (sec > 59)
            return bad(err, text, "second out of range");
        if (*p == 'Z' || *p == 'z') {
            p++;
        } else if (*p == '+' || *p == '-') {
            int sign = *p++ == '-' ? -1 : 1, oh, om = 0;
            if (digits(&p, 2, &oh) < 0)
                return bad(err, text, "bad zone offset");
            if (*p == ':') {
                p++;
                if (digits(&p, 2, &om) < 0)
                    return bad(err, text, "bad zone offset");
            } else if (*p >= '0' && *p <= '9') {
                if (digits(&p, 2, &om) < 0)
                    return bad(err, text, "bad zone offset");
            }
            if (oh > 23 || om > 59)
                return bad(err, text, "zone offset out of range");
            offset = sign * ((int64_t)oh * 3600 + om * 60) * USEC_PER_SEC;
        } else if (*p == '\0') {
            return bad(err, text, "no time zone ('Z' or an offset)");
        } else {
            return bad(err, text, "unexpected text after the time");
        }
        if (*p)
            return bad(err, text, "unexpected text after the zone");
    }

    *usec = days_from_civil(year, mon, day) * USEC_PER_DAY +
            ((int64_t)hour * 3600 + min * 60 + sec) * USEC_PER_SEC + frac -
            offset;
    /* Instants stay within the years 0001-9999 (UTC): PostgreSQL has no
     * year 0, and an offset that carried 9999-12-31 into year 10000 would
     * be formatted in a form this parser refuses. */
    if (*usec < days_from_civil(1, 1, 1) * USEC_PER_DAY ||
        *usec >= days_from_civil(10000, 1, 1) * USEC_PER_DAY)
        return bad(err, text, "instant outside the years 0001 to 9999");
    return 0;
}

static char *put_digits(char *o, int64_t v, int width)
{
    for (int i = width - 1; i >= 0; i--, v /= 10)
        o[i] = (char)('0' + v % 10);
    return o + width;
}

void es_time_format(int64_t usec, char out[32])
{
    int64_t days = usec / USEC_PER_DAY, rem = usec % USEC_PER_DAY, y;
    int m, d;
    char *o = out;
    if (rem < 0) {
        rem += USEC_PER_DAY;
        days--;
    }
    civil_from_days(days, &y, &m, &d);
    /* int64 microseconds span years -290308..294247: at most 6 digits */
    if (y < 0) {
        *o++ = '-';
        y = -y;
    }
    o = put_digits(o, y, y > 99999 ? 6 : y > 9999 ? 5 : 4);
    *o++ = '-';
    o = put_digits(o, m, 2);
    *o++ = '-';
    o = put_digits(o, d, 2);
    *o++ = 'T';
    int64_t secs = rem / USEC_PER_SEC;
    o = put_digits(o, secs / 3600, 2);
    *o++ = ':';
    o = put_digits(o, secs / 60 % 60, 2);
    *o++ = ':';
    o = put_digits(o, secs % 60, 2);
    *o++ = '.';
    o = put_digits(o, rem % USEC_PER_SEC, 6);
    *o++ = 'Z';
    *o = '\0';
}

int64_t es_time_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * USEC_PER_SEC + ts.tv_nsec / 1000;
}
