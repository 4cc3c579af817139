"""Prompts of the built-in ``sentiment`` dataset: project-written templates × subjects, in four domains.

The controlled-sentiment setting of the DPO paper (sec. 6.1) asks a model for text whose sentiment a
classifier scores. Here a prompt asks for a short review / opinion / reply about a *subject* (a product,
film, food, place, book, service ...), written from a *template* of one *domain*. The domains differ in how
familiar they are to a small English-centric instruction model:

- ``en_plain``: plain English instructions;
- ``en_garbled``: unusual English: typos, odd word order, all-caps, telegraphic or chat-speak phrasing;
- ``zh``: Chinese instructions (subjects in Chinese);
- ``fr``: French instructions (subjects in French).

Train and test prompts never share a subject (the subjects are split by a seeded shuffle), hence never a
(template, subject) pair; every template is used in both splits. Everything here is deterministic given
the seed, and nothing needs a model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

DOMAINS: tuple[str, ...] = ("en_plain", "en_garbled", "zh", "fr")


@dataclass(frozen=True)
class Subject:
    """One subject in three languages; ``en`` (with its article) is the subject's id."""

    category: str
    en: str
    fr: str
    zh: str

    @property
    def key(self) -> str:
        return self.en


@dataclass(frozen=True)
class Template:
    """A prompt template of one domain. Placeholders: ``{s}`` English subject, ``{S}`` the same in capitals,
    ``{n}`` English subject without its leading article, ``{f}`` French subject, ``{z}`` Chinese subject."""

    id: str
    domain: str
    text: str

    def render(self, subject: Subject) -> str:
        return self.text.format(s=subject.en, S=subject.en.upper(), n=_strip_article(subject.en), f=subject.fr, z=subject.zh)


@dataclass(frozen=True)
class SentimentPrompt:
    """One prompt of the dataset: the plain user text (not chat-templated) and where it came from."""

    prompt: str
    domain: str
    subject: str
    template_id: str


def _strip_article(text: str) -> str:
    for article in ("a ", "an ", "the "):
        if text.startswith(article):
            return text[len(article) :]
    return text


# --------------------------------------------------------------------------------------------------
# Subjects: (english, french, chinese), grouped by category
# --------------------------------------------------------------------------------------------------

_SUBJECTS: dict[str, list[tuple[str, str, str]]] = {
    "gadget": [
        ("a pair of wireless earbuds", "des écouteurs sans fil", "无线耳机"),
        ("a budget smartphone", "un smartphone d'entrée de gamme", "一款入门级智能手机"),
        ("a mechanical keyboard", "un clavier mécanique", "机械键盘"),
        ("a smartwatch", "une montre connectée", "智能手表"),
        ("a laptop for students", "un ordinateur portable pour étudiants", "一台学生笔记本电脑"),
        ("a portable power bank", "une batterie externe", "充电宝"),
        ("a pair of noise-cancelling headphones", "un casque à réduction de bruit", "降噪耳机"),
        ("an e-book reader", "une liseuse électronique", "电子书阅读器"),
        ("a tablet computer", "une tablette tactile", "平板电脑"),
        ("a gaming mouse", "une souris gaming", "游戏鼠标"),
        ("a fitness tracker", "un bracelet d'activité", "运动手环"),
        ("a Bluetooth speaker", "une enceinte Bluetooth", "蓝牙音箱"),
        ("a digital camera", "un appareil photo numérique", "数码相机"),
        ("an action camera", "une caméra d'action", "运动相机"),
        ("a smart home speaker", "une enceinte intelligente", "智能音箱"),
        ("a computer monitor", "un écran d'ordinateur", "电脑显示器"),
        ("a USB-C charger", "un chargeur USB-C", "USB-C充电器"),
        ("a video game console", "une console de jeux vidéo", "游戏机"),
        ("a drone with a camera", "un drone avec caméra", "带摄像头的无人机"),
        ("a wireless router", "un routeur sans fil", "无线路由器"),
        ("a phone case", "une coque de téléphone", "手机壳"),
        ("a webcam", "une webcam", "网络摄像头"),
        ("an electric toothbrush", "une brosse à dents électrique", "电动牙刷"),
        ("a robot vacuum cleaner", "un aspirateur robot", "扫地机器人"),
        ("a virtual reality headset", "un casque de réalité virtuelle", "虚拟现实头显"),
        ("a printer", "une imprimante", "打印机"),
        ("an electric scooter", "une trottinette électrique", "电动滑板车"),
        ("a car dashboard camera", "une caméra embarquée pour voiture", "行车记录仪"),
        ("a graphing calculator", "une calculatrice graphique", "图形计算器"),
        ("a solar-powered lamp", "une lampe solaire", "太阳能灯"),
    ],
    "household": [
        ("a coffee machine", "une machine à café", "咖啡机"),
        ("a kitchen blender", "un mixeur de cuisine", "搅拌机"),
        ("a rice cooker", "un cuiseur à riz", "电饭煲"),
        ("an air fryer", "une friteuse à air", "空气炸锅"),
        ("a microwave oven", "un four à micro-ondes", "微波炉"),
        ("a washing machine", "une machine à laver", "洗衣机"),
        ("a memory foam mattress", "un matelas à mémoire de forme", "记忆棉床垫"),
        ("an office chair", "une chaise de bureau", "办公椅"),
        ("a non-stick frying pan", "une poêle antiadhésive", "不粘锅"),
        ("an electric kettle", "une bouilloire électrique", "电水壶"),
        ("a desk lamp", "une lampe de bureau", "台灯"),
        ("a set of kitchen knives", "un ensemble de couteaux de cuisine", "一套厨房刀具"),
        ("a hair dryer", "un sèche-cheveux", "吹风机"),
        ("a steam iron", "un fer à repasser à vapeur", "蒸汽熨斗"),
        ("a dishwasher", "un lave-vaisselle", "洗碗机"),
        ("an air purifier", "un purificateur d'air", "空气净化器"),
        ("a ceiling fan", "un ventilateur de plafond", "吊扇"),
        ("a pair of running shoes", "une paire de chaussures de course", "跑鞋"),
        ("a winter coat", "un manteau d'hiver", "冬季外套"),
        ("a travel backpack", "un sac à dos de voyage", "旅行背包"),
        ("a rolling suitcase", "une valise à roulettes", "拉杆箱"),
        ("a yoga mat", "un tapis de yoga", "瑜伽垫"),
        ("a camping tent", "une tente de camping", "露营帐篷"),
        ("a stainless steel water bottle", "une gourde en inox", "不锈钢水瓶"),
        ("a wool sweater", "un pull en laine", "羊毛衫"),
        ("a pair of sunglasses", "une paire de lunettes de soleil", "太阳镜"),
        ("a bicycle helmet", "un casque de vélo", "自行车头盔"),
        ("a scented candle", "une bougie parfumée", "香薰蜡烛"),
        ("a sunscreen lotion", "une crème solaire", "防晒霜"),
        ("a bottle of shampoo", "un flacon de shampooing", "洗发水"),
    ],
    "media": [
        ("a romantic comedy film", "une comédie romantique", "一部浪漫喜剧电影"),
        ("a science fiction movie", "un film de science-fiction", "一部科幻电影"),
        ("a horror film", "un film d'horreur", "一部恐怖片"),
        ("an animated family movie", "un film d'animation familial", "一部合家欢动画电影"),
        ("a war documentary", "un documentaire sur la guerre", "一部战争纪录片"),
        ("a nature documentary", "un documentaire animalier", "一部自然纪录片"),
        ("a superhero blockbuster", "un blockbuster de super-héros", "一部超级英雄大片"),
        ("a crime thriller series", "une série policière", "一部犯罪惊悚剧"),
        ("a cooking competition show", "une émission de concours culinaire", "一档烹饪比赛节目"),
        ("a reality TV show", "une émission de téléréalité", "一档真人秀节目"),
        ("a historical drama series", "une série historique", "一部历史剧"),
        ("a sitcom", "une sitcom", "一部情景喜剧"),
        ("a stand-up comedy special", "un spectacle d'humour", "一场单口喜剧专场"),
        ("a jazz album", "un album de jazz", "一张爵士专辑"),
        ("a pop music concert", "un concert de musique pop", "一场流行音乐会"),
        ("a classical piano recital", "un récital de piano classique", "一场古典钢琴独奏会"),
        ("a rock festival", "un festival de rock", "一场摇滚音乐节"),
        ("a musical theatre show", "une comédie musicale", "一部音乐剧"),
        ("an opera performance", "une représentation d'opéra", "一场歌剧演出"),
        ("a podcast about history", "un podcast sur l'histoire", "一档历史播客"),
        ("an open-world video game", "un jeu vidéo en monde ouvert", "一款开放世界游戏"),
        ("a puzzle game for phones", "un jeu de réflexion sur mobile", "一款手机益智游戏"),
        ("a multiplayer shooter game", "un jeu de tir multijoueur", "一款多人射击游戏"),
        ("a board game for families", "un jeu de société familial", "一款家庭桌游"),
        ("a chess app", "une application d'échecs", "一款国际象棋应用"),
        ("a music streaming app", "une application de streaming musical", "一款音乐流媒体应用"),
        ("a photo editing app", "une application de retouche photo", "一款修图应用"),
        ("a language learning app", "une application d'apprentissage des langues", "一款语言学习应用"),
        ("a video streaming service", "un service de streaming vidéo", "一个视频流媒体平台"),
        ("a social media platform", "un réseau social", "一个社交媒体平台"),
    ],
    "culture": [
        ("a mystery novel", "un roman policier", "一本推理小说"),
        ("a fantasy book series", "une saga de fantasy", "一套奇幻小说"),
        ("a self-help book", "un livre de développement personnel", "一本自我提升类书籍"),
        ("a cookbook", "un livre de cuisine", "一本菜谱"),
        ("a biography of a scientist", "une biographie d'un scientifique", "一本科学家传记"),
        ("a children's picture book", "un album illustré pour enfants", "一本儿童绘本"),
        ("a poetry collection", "un recueil de poèmes", "一本诗集"),
        ("a travel guidebook", "un guide de voyage", "一本旅游指南"),
        ("a history textbook", "un manuel d'histoire", "一本历史教科书"),
        ("a graphic novel", "une bande dessinée", "一本图像小说"),
        ("a science magazine", "un magazine scientifique", "一本科学杂志"),
        ("a local newspaper", "un journal local", "一份本地报纸"),
        ("an art exhibition", "une exposition d'art", "一个艺术展览"),
        ("a natural history museum", "un musée d'histoire naturelle", "一座自然历史博物馆"),
        ("a photography exhibition", "une exposition de photographie", "一场摄影展"),
        ("a public library", "une bibliothèque municipale", "一座公共图书馆"),
        ("a poetry reading night", "une soirée de lecture de poésie", "一场诗歌朗诵会"),
        ("a ballet performance", "un spectacle de ballet", "一场芭蕾舞演出"),
        ("a street art tour", "une visite guidée de street art", "一次街头艺术导览"),
        ("a pottery class", "un cours de poterie", "一堂陶艺课"),
        ("a painting workshop", "un atelier de peinture", "一个绘画工作坊"),
        ("an online programming course", "un cours de programmation en ligne", "一门在线编程课程"),
        ("a public lecture on astronomy", "une conférence publique sur l'astronomie", "一场天文学公开讲座"),
        ("a book club meeting", "une réunion de club de lecture", "一次读书会"),
        ("a science fair", "une foire scientifique", "一场科技展览会"),
    ],
    "food": [
        ("a bowl of ramen", "un bol de ramen", "一碗拉面"),
        ("a margherita pizza", "une pizza margherita", "玛格丽特披萨"),
        ("a cheeseburger", "un cheeseburger", "芝士汉堡"),
        ("a chocolate cake", "un gâteau au chocolat", "巧克力蛋糕"),
        ("a cup of green tea", "une tasse de thé vert", "一杯绿茶"),
        ("a cappuccino", "un cappuccino", "一杯卡布奇诺"),
        ("a plate of sushi", "une assiette de sushis", "一盘寿司"),
        ("a vegetable curry", "un curry de légumes", "蔬菜咖喱"),
        ("a Caesar salad", "une salade César", "凯撒沙拉"),
        ("a croissant", "un croissant", "可颂面包"),
        ("a bowl of tomato soup", "un bol de soupe à la tomate", "一碗番茄汤"),
        ("a plate of dumplings", "une assiette de raviolis chinois", "一盘饺子"),
        ("a fruit smoothie", "un smoothie aux fruits", "水果奶昔"),
        ("a bar of dark chocolate", "une tablette de chocolat noir", "一块黑巧克力"),
        ("a bag of potato chips", "un paquet de chips", "一包薯片"),
        ("a can of energy drink", "une canette de boisson énergisante", "一罐能量饮料"),
        ("a bottle of red wine", "une bouteille de vin rouge", "一瓶红酒"),
        ("a craft beer", "une bière artisanale", "一杯精酿啤酒"),
        ("a bowl of breakfast cereal", "un bol de céréales", "一碗早餐麦片"),
        ("a vanilla ice cream", "une glace à la vanille", "香草冰淇淋"),
        ("a spicy hot pot", "une fondue chinoise épicée", "麻辣火锅"),
        ("a bowl of fried rice", "un bol de riz cantonais", "一碗炒饭"),
        ("a beef steak", "un steak de bœuf", "一块牛排"),
        ("a grilled salmon fillet", "un pavé de saumon grillé", "一份烤三文鱼"),
        ("a vegan burger", "un burger végétalien", "素食汉堡"),
        ("a plate of pancakes", "une assiette de pancakes", "一盘松饼"),
        ("a bowl of pho", "un bol de pho", "一碗越南河粉"),
        ("a cheese platter", "un plateau de fromages", "一份奶酪拼盘"),
        ("a bubble tea", "un bubble tea", "一杯珍珠奶茶"),
        ("a homemade apple pie", "une tarte aux pommes maison", "自制苹果派"),
        ("a supermarket sandwich", "un sandwich de supermarché", "超市三明治"),
        ("a frozen pizza", "une pizza surgelée", "冷冻披萨"),
        ("a bowl of instant noodles", "un bol de nouilles instantanées", "一碗方便面"),
        ("a glass of fresh orange juice", "un verre de jus d'orange frais", "一杯鲜榨橙汁"),
        ("a bottle of sparkling water", "une bouteille d'eau gazeuse", "一瓶气泡水"),
    ],
    "place": [
        ("a beach resort", "une station balnéaire", "一个海滨度假村"),
        ("a mountain hiking trail", "un sentier de randonnée en montagne", "一条山间徒步路线"),
        ("a city center hotel", "un hôtel en centre-ville", "一家市中心酒店"),
        ("a youth hostel", "une auberge de jeunesse", "一家青年旅舍"),
        ("a national park", "un parc national", "一座国家公园"),
        ("a theme park", "un parc d'attractions", "一座主题公园"),
        ("a zoo", "un zoo", "一座动物园"),
        ("an aquarium", "un aquarium", "一座水族馆"),
        ("a ski resort", "une station de ski", "一个滑雪场"),
        ("a small seaside town", "une petite ville côtière", "一座海边小镇"),
        ("a busy train station", "une gare très fréquentée", "一个繁忙的火车站"),
        ("an international airport", "un aéroport international", "一座国际机场"),
        ("a shopping mall", "un centre commercial", "一家购物中心"),
        ("a farmers' market", "un marché de producteurs", "一个农贸市场"),
        ("a botanical garden", "un jardin botanique", "一座植物园"),
        ("a city park", "un parc municipal", "一座城市公园"),
        ("a camping site by a lake", "un camping au bord d'un lac", "湖边的露营地"),
        ("a medieval castle", "un château médiéval", "一座中世纪城堡"),
        ("a historic old town", "une vieille ville historique", "一座历史古城"),
        ("a public swimming pool", "une piscine municipale", "一个公共游泳池"),
        ("a gym", "une salle de sport", "一家健身房"),
        ("a coworking space", "un espace de coworking", "一个联合办公空间"),
        ("a university campus", "un campus universitaire", "一所大学校园"),
        ("a night market", "un marché de nuit", "一个夜市"),
        ("a countryside bed and breakfast", "une chambre d'hôtes à la campagne", "一家乡村民宿"),
        ("a cruise ship", "un bateau de croisière", "一艘游轮"),
        ("a rooftop bar", "un bar sur les toits", "一家屋顶酒吧"),
        ("an amusement arcade", "une salle d'arcade", "一家电玩城"),
        ("a public beach", "une plage publique", "一片公共海滩"),
        ("a waterfall hike", "une randonnée jusqu'à une cascade", "一次瀑布徒步"),
    ],
    "service": [
        ("a food delivery app", "une application de livraison de repas", "一款外卖应用"),
        ("a taxi ride", "une course en taxi", "一次出租车乘车"),
        ("a ride-sharing service", "un service de VTC", "一个网约车服务"),
        ("a budget airline flight", "un vol avec une compagnie low cost", "一次廉价航空航班"),
        ("a long-distance train journey", "un long trajet en train", "一次长途火车旅行"),
        ("the city bus service", "le réseau de bus de la ville", "城市公交服务"),
        ("an internet provider", "un fournisseur d'accès à internet", "一家宽带运营商"),
        ("a mobile phone plan", "un forfait de téléphone mobile", "一个手机套餐"),
        ("a bank's customer service", "le service client d'une banque", "一家银行的客户服务"),
        ("an online bank account", "un compte bancaire en ligne", "一个网上银行账户"),
        ("a car rental company", "une agence de location de voitures", "一家租车公司"),
        ("a hair salon", "un salon de coiffure", "一家理发店"),
        ("a dental clinic", "un cabinet dentaire", "一家牙科诊所"),
        ("a veterinary clinic", "une clinique vétérinaire", "一家宠物医院"),
        ("a house cleaning service", "un service de ménage à domicile", "一家家政保洁服务"),
        ("a moving company", "une entreprise de déménagement", "一家搬家公司"),
        ("a car repair garage", "un garage de réparation automobile", "一家汽车修理厂"),
        ("a laundry service", "une laverie", "一家洗衣店"),
        ("a parcel delivery service", "un service de livraison de colis", "一家快递公司"),
        ("a hotel booking website", "un site de réservation d'hôtels", "一个酒店预订网站"),
        ("a cloud storage service", "un service de stockage en ligne", "一个云存储服务"),
        ("an online shopping website", "un site d'achat en ligne", "一个网购平台"),
        ("a customer support chatbot", "un chatbot de service client", "一个客服聊天机器人"),
        ("a personal trainer", "un coach sportif personnel", "一位私人健身教练"),
        ("a driving school", "une auto-école", "一所驾校"),
        ("a guided city tour", "une visite guidée de la ville", "一次城市导览游"),
        ("a language school", "une école de langues", "一所语言学校"),
        ("a massage spa", "un spa de massage", "一家按摩水疗馆"),
        ("a wedding photographer", "un photographe de mariage", "一位婚礼摄影师"),
        ("a tax preparation service", "un service de déclaration d'impôts", "一家报税服务机构"),
    ],
    "venue": [
        ("an Italian restaurant", "un restaurant italien", "一家意大利餐厅"),
        ("a fast food chain", "une chaîne de restauration rapide", "一家快餐连锁店"),
        ("a neighbourhood bakery", "une boulangerie de quartier", "一家社区面包店"),
        ("a vegetarian café", "un café végétarien", "一家素食咖啡馆"),
        ("a sushi bar", "un bar à sushis", "一家寿司店"),
        ("a street food stall", "un stand de cuisine de rue", "一个街边小吃摊"),
        ("a fine dining restaurant", "un restaurant gastronomique", "一家高级餐厅"),
        ("a family-run diner", "un petit restaurant familial", "一家家庭经营的小饭馆"),
        ("a coffee shop chain", "une chaîne de cafés", "一家连锁咖啡店"),
        ("an all-you-can-eat buffet", "un buffet à volonté", "一家自助餐厅"),
        ("a pizza delivery place", "une pizzeria avec livraison", "一家外卖披萨店"),
        ("a tea house", "un salon de thé", "一家茶馆"),
        ("a brewery pub", "une brasserie artisanale", "一家精酿酒吧"),
        ("a dim sum restaurant", "un restaurant de dim sum", "一家早茶点心店"),
        ("a barbecue restaurant", "un restaurant de grillades", "一家烧烤店"),
        ("a bookstore", "une librairie", "一家书店"),
        ("a second-hand clothing shop", "une friperie", "一家二手服装店"),
        ("a furniture store", "un magasin de meubles", "一家家具店"),
        ("an electronics store", "un magasin d'électronique", "一家电子产品商店"),
        ("a supermarket", "un supermarché", "一家超市"),
        ("a convenience store", "une supérette", "一家便利店"),
        ("a flower shop", "un fleuriste", "一家花店"),
        ("a toy store", "un magasin de jouets", "一家玩具店"),
        ("a sports equipment shop", "un magasin d'articles de sport", "一家体育用品店"),
        ("a cinema", "un cinéma", "一家电影院"),
        ("a karaoke bar", "un bar karaoké", "一家KTV"),
        ("a bowling alley", "un bowling", "一家保龄球馆"),
        ("an escape room", "un escape game", "一个密室逃脱"),
        ("a jazz club", "un club de jazz", "一家爵士俱乐部"),
        ("a nightclub", "une boîte de nuit", "一家夜店"),
    ],
}

SUBJECTS: tuple[Subject, ...] = tuple(
    Subject(category=category, en=en, fr=fr, zh=zh) for category, rows in _SUBJECTS.items() for en, fr, zh in rows
)

# --------------------------------------------------------------------------------------------------
# Templates: 12 per domain. French templates avoid "de {f}" / "à {f}" (elision: du, au, d'un).
# --------------------------------------------------------------------------------------------------

_TEMPLATES: dict[str, list[str]] = {
    "en_plain": [
        "Write a short review of {s}.",
        "What do you think of {s}? Answer in two or three sentences.",
        "Give me your honest opinion of {s} in a few sentences.",
        "A friend is thinking about trying {s}. Write them a short reply with your opinion.",
        "Write a brief customer review of {s}.",
        "Describe your experience with {s} in a short paragraph.",
        "Write a one-sentence review of {s}.",
        "Post a short comment about {s} on an online forum.",
        "How would you rate {s}? Explain briefly.",
        "Write a short social media post about {s}.",
        "In a few sentences, tell me how you feel about {s}.",
        "Write a quick answer to a survey that asks about {s}.",
    ],
    "en_garbled": [
        "pls write short reveiw of {s} thx",
        "WRITE A SHORT REVIEW OF {S}!!!",
        "{n} ... u think good or bad?? tell few sentence",
        "review: {n}. short. go",
        "opinon about {s} give me quick, 2 sentense",
        "Short review of the {n} write you must.",
        "hey so {s}, whats ur honest take lol keep it short",
        "WHAT DO YOU THINK OF {S}? SHORT ANSWER",
        "writ custmer reveiw 4 {s} plz short",
        "{n} -- experience? describe brief. no long",
        "ok so like, {s}?? thoughts?? short pls",
        "give rating+opinion {n} in few word, thanx",
    ],
    "zh": [
        "请写一段关于{z}的简短评论。",
        "你觉得{z}怎么样？请用两三句话回答。",
        "请用几句话谈谈你对{z}的真实看法。",
        "朋友想尝试{z}，请给他写一段简短的回复，说说你的看法。",
        "请为{z}写一条简短的顾客评价。",
        "请简单描述一下你对{z}的体验。",
        "用一句话评价{z}。",
        "请在网络论坛上发一条关于{z}的简短评论。",
        "你会给{z}打几分？请简要说明理由。",
        "请写一条关于{z}的社交媒体短帖。",
        "请简短地说说你对{z}的感受。",
        "有一份问卷问到{z}，请写一段简短的回答。",
    ],
    "fr": [
        "Écris un court avis sur {f}.",
        "Donne ton avis honnête sur {f} en deux ou trois phrases.",
        "Quelle est ton opinion sur {f} ? Réponds brièvement.",
        "Un ami hésite à essayer {f}. Écris-lui une courte réponse avec ton avis.",
        "Rédige un bref commentaire client concernant {f}.",
        "Décris en quelques phrases ton expérience avec {f}.",
        "Donne en une phrase ton avis sur {f}.",
        "Publie un court commentaire sur {f} dans un forum en ligne.",
        "Sur une échelle de 1 à 10, comment évalues-tu {f} ? Explique brièvement.",
        "Écris un court message pour les réseaux sociaux sur {f}.",
        "Raconte brièvement ce que tu as pensé en découvrant {f}.",
        "Un sondage te demande ton avis sur {f}. Écris une réponse courte.",
    ],
}

TEMPLATES: tuple[Template, ...] = tuple(
    Template(id=f"{domain}_{i:02d}", domain=domain, text=text)
    for domain, texts in _TEMPLATES.items()
    for i, text in enumerate(texts)
)


def templates_of(domain: str) -> list[Template]:
    """The templates of one domain, in their fixed order."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} is not one of {DOMAINS}")
    return [t for t in TEMPLATES if t.domain == domain]


def split_subjects(seed: int, test_fraction: float = 1 / 6) -> tuple[list[Subject], list[Subject]]:
    """Disjoint (train, test) subject lists: a seeded shuffle of all subjects, the first ``test_fraction``
    (rounded, at least one) going to test. Deterministic given ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    subjects = sorted(SUBJECTS, key=lambda s: s.key)
    random.Random(f"sentiment-subjects-{seed}").shuffle(subjects)
    n_test = max(1, round(len(subjects) * test_fraction))
    return subjects[n_test:], subjects[:n_test]


def _per_domain(total: int, domains: Sequence[str]) -> list[int]:
    base, extra = divmod(total, len(domains))
    return [base + (1 if i < extra else 0) for i in range(len(domains))]


def _sample_split(
    subjects: Sequence[Subject], total: int, domains: Sequence[str], seed: int, split: str
) -> list[SentimentPrompt]:
    """``total`` prompts balanced over ``domains``, each a distinct (template, subject) pair of its domain."""
    prompts: list[SentimentPrompt] = []
    for domain, n in zip(domains, _per_domain(total, domains)):
        pairs = [(t, s) for s in subjects for t in templates_of(domain)]
        if n > len(pairs):
            raise ValueError(
                f"{split}: {n} {domain} prompts asked for, but only {len(pairs)} (template, subject) pairs exist"
            )
        random.Random(f"sentiment-{split}-{domain}-{seed}").shuffle(pairs)
        prompts.extend(
            SentimentPrompt(prompt=t.render(s), domain=domain, subject=s.key, template_id=t.id) for t, s in pairs[:n]
        )
    random.Random(f"sentiment-{split}-order-{seed}").shuffle(prompts)
    return prompts


def build_prompts(
    seed: int = 0,
    num_train: int = 2000,
    num_test: int = 300,
    domains: Sequence[str] = DOMAINS,
    test_fraction: float = 1 / 6,
) -> dict[str, list[SentimentPrompt]]:
    """Train and test prompts, balanced over ``domains``, with disjoint subjects.

    Returns ``{"train": [...], "test": [...]}``, each list in a seeded random order (domains interleaved).
    """
    for domain in domains:
        templates_of(domain)  # validates the name
    train_subjects, test_subjects = split_subjects(seed, test_fraction)
    return {
        "train": _sample_split(train_subjects, num_train, domains, seed, "train"),
        "test": _sample_split(test_subjects, num_test, domains, seed, "test"),
    }


__all__ = [
    "DOMAINS",
    "SUBJECTS",
    "TEMPLATES",
    "SentimentPrompt",
    "Subject",
    "Template",
    "build_prompts",
    "split_subjects",
    "templates_of",
]
