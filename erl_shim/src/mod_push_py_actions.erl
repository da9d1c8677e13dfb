%%%----------------------------------------------------------------------
%%% mod_push_py_actions: what the actions Python sends make, without state: the XML of a
%%% publish IQ's <pubsub/>, stanzas parsed for routing, log lines in ejabberd's log, and
%%% what an app server's answer to a publish means to Python. The port owner
%%% (mod_push_py_port) executes the actions; see docs/protocol.md of pymod_push.
%%%
%%% Copyright (C) 2026 the pymod_push authors. GPL-2.0-or-later.
%%%----------------------------------------------------------------------
-module(mod_push_py_actions).

-export([execute/2, decode/1, answer_iq/2, route/1, set_push/2, app_server/2, pubsub/4,
         parse_xml/1, publish_outcome/1, log/2, counters/1, route_states/2]).

-include("xmpp.hrl").
-include("logger.hrl").

-type form() :: [{binary(), [binary()]}].

-define(JID_CACHE, 1000).  % app servers' JIDs kept decoded, at most

%% The actions the port owner executes without its state, in the port owner's process:
%% routed stanzas, set_push, the push options forms, log lines, group chats' and
%% UnifiedPush's ({unified_push, _}, up_push, http_reply: mod_push_py_up).
-spec execute(binary(), term()) -> ok.
execute(_Host, {route, Xml}) ->
    route(Xml);
execute(_Host, {set_push, Session, Value}) ->
    set_push(Session, {mod_push_py, set_push, Value});
execute(_Host, {set_push, Session, Value, Roster}) when is_boolean(Roster) ->
    set_push(Session, {mod_push_py, set_push, Value, Roster});
execute(Host, {push_options, Key, undefined}) ->
    ets:delete(mod_push_py_port:options_table(Host), Key),
    ok;
execute(Host, {push_options, Key, Fields}) ->
    ets:insert(mod_push_py_port:options_table(Host), {Key, Fields}),
    ok;
execute(_Host, {log, Level, Text}) ->
    log(Level, Text);
execute(Host, {groupchat, Action}) ->
    mod_push_py_muc:execute(Host, Action);
execute(Host, Action) when element(1, Action) == unified_push; element(1, Action) == up_push;
                           element(1, Action) == http_reply ->
    mod_push_py_up:execute(Host, Action);
execute(_Host, Action) ->
    ?WARNING_MSG("mod_push_py: unknown action from Python ignored: ~P", [Action, 10]).

%% A frame from Python: never an atom it did not know (binary_to_term's safe).
-spec decode(binary()) -> {ok, term()} | error.
decode(Bin) ->
    try {ok, binary_to_term(Bin, [safe])}
    catch error:badarg -> error
    end.

%% Python's answer to a push IQ, unless the IQ was answered with a timeout error already
%% (the IQ waits in the meta table, see mod_push_py_port:send_iq/4).
-spec answer_iq(atom(), tuple()) -> ok.
answer_iq(Meta, Answer) ->
    case ets:take(Meta, {iq, element(2, Answer)}) of
        [{_, IQ, _}] -> ejabberd_router:route(reply(IQ, Answer));
        [] -> ok
    end,
    ok.

reply(IQ, {iq_result, _, Xml}) ->
    xmpp:make_iq_result(IQ, parse_xml(Xml));
reply(IQ, {iq_error, _, Type, Reason, Text}) ->
    xmpp:make_error(IQ, #stanza_error{type = Type, reason = Reason,
                                      text = xmpp:mk_text(Text, IQ#iq.lang)}).

%% A stanza Python made (an answer of the app server), routed as it is.
-spec route(binary()) -> ok.
route(Xml) ->
    ejabberd_router:route(xmpp:decode(parse_xml(Xml), ?NS_CLIENT, [ignore_els])).

%% Whether a session has push (and needs roster items), told to its c2s process.
-spec set_push({binary(), binary(), binary()}, tuple()) -> ok.
set_push({U, S, R}, Message) ->
    %% a push user from now on, for group chat pushes (mod_push_py_muc)
    element(3, Message) =/= false andalso mod_push_py_muc:execute(S, {users, add, [{U, S}]}),
    case ejabberd_sm:get_session_pid(U, S, R) of
        Pid when is_pid(Pid) -> ejabberd_c2s:cast(Pid, Message);
        none -> ok
    end.

%% An app server's JID, decoded (stringprep) once rather than for every publish: Known
%% maps the JIDs as Python names them to the decoded ones (jid:decode/1 raises on a bad one).
-spec app_server(binary(), #{binary() => jid()}) -> {jid(), #{binary() => jid()}}.
app_server(To, Known) ->
    case Known of
        #{To := Jid} -> {Jid, Known};
        _ ->
            Jid = jid:decode(To),
            Kept = case map_size(Known) < ?JID_CACHE of
                       true -> Known;
                       false -> #{}
                   end,
            {Jid, Kept#{To => Jid}}
    end.

%% The publish's <pubsub/>, made as XML elements: the same bytes as xmpp_codec makes of
%% #pubsub{publish = #ps_publish{node = Node, items = [#ps_item{sub_els =
%% [#push_notification{xdata = ...}]}]}, publish_options = #xdata{}}, without the codec's
%% work, which the app server's c2s (or s2s) process did for every publish when it
%% encoded the IQ to send it.
-spec pubsub(binary(), form(), form() | undefined, [binary()]) -> fxml:xmlel().
pubsub(Node, Fields, Options, Elements) ->
    Item = #xmlel{name = <<"item">>, children = [notification(Fields, Elements)]},
    Publish = #xmlel{name = <<"publish">>, attrs = [{<<"node">>, Node}], children = [Item]},
    #xmlel{name = <<"pubsub">>, attrs = [{<<"xmlns">>, ?NS_PUBSUB}],
           children = [Publish | case Options of
                                     undefined -> [];
                                     _ -> [#xmlel{name = <<"publish-options">>,
                                                  children = [form(Options)]}]
                                 end]}.

%% <notification/>: the summary form, and after it the extension elements Python made
%% (Tigase's <encrypted/>, <priority/>, <jingle/>), if any.
notification(Fields, []) ->
    #xmlel{name = <<"notification">>, attrs = [{<<"xmlns">>, ?NS_PUSH_0}],
           children = [form(Fields)]};
notification(Fields, Elements) ->
    Form = case Fields of
               [] -> [];
               _ -> [form(Fields)]
           end,
    #xmlel{name = <<"notification">>, attrs = [{<<"xmlns">>, ?NS_PUSH_0}],
           children = Form ++ [parse_xml(E) || E <- Elements]}.

%% A submitted data form from [{Var, [Value]}]; FORM_TYPE is hidden (XEP-0068).
form(Fields) ->
    #xmlel{name = <<"x">>, attrs = [{<<"type">>, <<"submit">>}, {<<"xmlns">>, ?NS_XDATA}],
           children = [#xmlel{name = <<"field">>,
                              attrs = case Var of
                                          <<"FORM_TYPE">> -> [{<<"var">>, Var},
                                                              {<<"type">>, <<"hidden">>}];
                                          _ -> [{<<"var">>, Var}]
                                      end,
                              children = [form_value(Value) || Value <- Values]}
                       || {Var, Values} <- Fields]}.

form_value(<<>>) -> #xmlel{name = <<"value">>};  % <value/>, as xmpp_codec writes it
form_value(Value) -> #xmlel{name = <<"value">>, children = [{xmlcdata, Value}]}.

-spec parse_xml(binary() | undefined) -> fxml:xmlel() | undefined.
parse_xml(undefined) -> undefined;
parse_xml(Xml) -> fxml_stream:parse_element(Xml).

%% An app server's answer to a publish (or none in time), as Python reads it.
-spec publish_outcome(timeout | iq()) -> timeout | result | {error, atom(), atom()}.
publish_outcome(timeout) -> timeout;
publish_outcome(#iq{type = result}) -> result;
publish_outcome(#iq{type = error} = IQ) ->
    case xmpp:get_error(IQ) of
        #stanza_error{type = Type, reason = Reason} when is_atom(Reason) ->
            {error, Type, Reason};
        #stanza_error{type = Type, reason = Reason} when is_tuple(Reason) ->
            {error, Type, element(1, Reason)};
        _ ->
            {error, cancel, 'undefined-condition'}
    end.

%% A log line Python asked for, at its level, in ejabberd's log.
-spec log(atom(), iodata()) -> ok.
log(debug, Text) -> ?DEBUG("~ts", [Text]);
log(info, Text) -> ?INFO_MSG("~ts", [Text]);
log(notice, Text) -> ?INFO_MSG("~ts", [Text]);
log(warning, Text) -> ?WARNING_MSG("~ts", [Text]);
log(error, Text) -> ?ERROR_MSG("~ts", [Text]);
log(_, Text) -> ?CRITICAL_MSG("~ts", [Text]).

%% The shim's counters since the module started on the host, from its meta table (they
%% outlive the Python process and the port owner): Python's restarts, the events held
%% while Python was down or behind, and those dropped. Written to Python after its hello
%% and every 10 s, for its metrics (docs/protocol.md).
-spec counters(atom()) -> {counters, #{restarts | held | dropped => non_neg_integer()}}.
counters(Meta) ->
    {counters, maps:from_list([{Key, case ets:lookup(Meta, Key) of
                                         [{_, N}] when is_integer(N) -> N;
                                         _ -> 0  % a table made by an older keeper
                                     end} || Key <- [restarts, held, dropped]])}.

%% How each app server domain is reachable from Host, in words, for push_diagnose:
%% [<<"Domain\tState">>]. Lookups in ejabberd's route and s2s tables, nothing sent.
-spec route_states(binary(), [string()]) -> [binary()].
route_states(Host, Domains) ->
    [<<(unicode:characters_to_binary(D))/binary, "\t", (route_state(Host, D))/binary>>
     || D <- Domains].

route_state(Host, Domain) ->
    try jid:nameprep(unicode:characters_to_binary(Domain)) of
        error -> <<"not a domain">>;
        LDomain ->
            case {lists:member(LDomain, ejabberd_option:hosts()),
                  ejabberd_router:is_my_route(LDomain)} of
                {true, _} -> <<"a host of this server (local route)">>;
                {false, true} -> <<"routed locally (a component or a module of this server)">>;
                {false, false} -> s2s_state(Host, LDomain)
            end
    catch _:_ -> <<"unknown">>
    end.

s2s_state(Host, Domain) ->
    case ejabberd_s2s:is_temporarly_blocked(Domain) of
        true -> <<"s2s: blocked for now after a failed connection attempt">>;
        false ->
            case ejabberd_s2s:have_connection({Host, Domain}) of
                true -> <<"s2s: connected">>;
                false -> <<"s2s: no connection now (the next push opens one)">>
            end
    end.
